import json

import pytest
import torch

from guard.adapters import check_adapter_fits, read_adapter, write_guard_meta
from guard.errors import GuardError
from training.trainer import LoraHParams, add_lora
from tests.conftest import make_tiny_llama


@pytest.fixture()
def adapter_dir(tmp_path, tiny_tokenizer):
    model = add_lora(make_tiny_llama(len(tiny_tokenizer)), LoraHParams(rank=4, targets=["q_proj", "v_proj"]))
    out = tmp_path / "adapter"
    model.save_pretrained(str(out))
    return out


def test_read_and_fit(adapter_dir, tiny_tokenizer):
    info = read_adapter(adapter_dir, max_rank=16)
    assert info.rank == 4 and set(info.targets) == {"q_proj", "v_proj"}
    check_adapter_fits(info, make_tiny_llama(len(tiny_tokenizer)).config)


def test_rank_above_max(adapter_dir):
    with pytest.raises(GuardError, match="rank 4 exceeds the configured maximum 2"):
        read_adapter(adapter_dir, max_rank=2)


def test_adapter_for_another_base(adapter_dir, tiny_tokenizer):
    wider = make_tiny_llama(len(tiny_tokenizer), hidden_size=96, num_attention_heads=4)
    with pytest.raises(GuardError, match=r"does not fit this base model: .*q_proj.*expected"):
        check_adapter_fits(read_adapter(adapter_dir), wider.config)
    shallower = make_tiny_llama(len(tiny_tokenizer), num_hidden_layers=1)
    with pytest.raises(GuardError, match="targets layer 1, the base model has 1 layers"):
        check_adapter_fits(read_adapter(adapter_dir), shallower.config)
    write_guard_meta(adapter_dir, {"base_fingerprint": "a" * 64})
    with pytest.raises(GuardError, match="made for base model aaaaaaaaaaaa"):
        check_adapter_fits(read_adapter(adapter_dir), make_tiny_llama(len(tiny_tokenizer)).config, "b" * 64)


def test_broken_adapters(adapter_dir, tmp_path, tiny_tokenizer):
    with pytest.raises(GuardError, match="adapter dir not found"):
        read_adapter(tmp_path / "nope")
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    (adapter_dir / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(GuardError, match="only LoRA adapters"):
        read_adapter(adapter_dir)
    (adapter_dir / "adapter_config.json").write_text(json.dumps(cfg))
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, str(adapter_dir / "adapter_model.safetensors"))
    with pytest.raises(GuardError, match="NaN"):
        check_adapter_fits(read_adapter(adapter_dir), make_tiny_llama(len(tiny_tokenizer)).config)
