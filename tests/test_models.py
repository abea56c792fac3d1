import pytest

from guard.errors import GuardError
from guard.models import ModelShape, check_model_dir, find_default_gguf, fingerprint_dir, fingerprint_module


def test_fingerprint_is_stable_memoised_and_weight_sensitive(tiny_model_dir, tiny_tokenizer):
    fp = fingerprint_dir(tiny_model_dir)
    assert fp == fingerprint_dir(tiny_model_dir) and len(fp) == 64
    assert (tiny_model_dir / ".guard-fingerprint.json").is_file()
    from tests.conftest import make_tiny_llama

    make_tiny_llama(len(tiny_tokenizer), seed=1).save_pretrained(tiny_model_dir)
    assert fingerprint_dir(tiny_model_dir) != fp


def test_module_fingerprint(tiny_model):
    fp = fingerprint_module(tiny_model)
    with __import__("torch").no_grad():
        tiny_model.model.norm.weight[0] += 1e-3
    assert fingerprint_module(tiny_model) != fp


def test_model_dir_errors(tmp_path):
    with pytest.raises(GuardError, match="dir not found"):
        check_model_dir(tmp_path / "nope")
    with pytest.raises(GuardError, match="no config.json"):
        check_model_dir(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(GuardError, match="no weight files"):
        check_model_dir(tmp_path)


def test_shape_from_config(tiny_model):
    s = ModelShape.from_config(tiny_model.config)
    assert (s.num_layers, s.hidden_size, s.num_heads, s.num_kv_heads, s.head_dim) == (2, 64, 4, 2, 16)
    assert ModelShape.from_config(tiny_model.config.to_dict()) == s


def test_default_gguf_is_installed():
    path = find_default_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000


def test_free_cores_is_within_the_machine():
    import os

    from guard.models import free_cores

    assert 1 <= free_cores() <= (os.cpu_count() or 1)
