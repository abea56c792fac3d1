from pathlib import Path

import pytest

from guard.config import GuardConfig, load_config, parse_config
from guard.errors import GuardError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "guard.yaml"
    p.write_text(text)
    return p


def test_defaults_and_empty_file(tmp_path):
    assert load_config(write(tmp_path, "")) == GuardConfig()
    cfg = load_config(write(tmp_path, "drift:\n  warn: 0.05\n  fail: 0.3\nanchors:\n  k: 4\n"))
    assert (cfg.drift.warn, cfg.drift.fail, cfg.anchors.k) == (0.05, 0.3, 4)


def test_unknown_key_names_its_path(tmp_path):
    with pytest.raises(GuardError, match=r"guard\.yaml: drift\.treshold: unknown key"):
        load_config(write(tmp_path, "drift:\n  treshold: 0.1\n"))


def test_bad_value_names_path_and_value(tmp_path):
    with pytest.raises(GuardError, match=r"align\.lr: .*less than 1.*\(got 5\)"):
        load_config(write(tmp_path, "align:\n  lr: 5\n"))
    with pytest.raises(GuardError, match=r"anchors\.k: .*integer"):
        load_config(write(tmp_path, "anchors:\n  k: many\n"))


def test_cross_field_check():
    with pytest.raises(GuardError, match="warn .* must not exceed fail"):
        parse_config({"drift": {"warn": 0.5, "fail": 0.1}})


def test_malformed_yaml_is_one_line(tmp_path):
    with pytest.raises(GuardError) as e:
        load_config(write(tmp_path, "drift: [1, 2\nanchors: {"))
    assert "malformed YAML at line" in str(e.value) and "\n" not in str(e.value)


def test_not_a_mapping_and_missing_file(tmp_path):
    with pytest.raises(GuardError, match="must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(GuardError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_env_var_and_home(tmp_path, monkeypatch):
    p = write(tmp_path, "runtime:\n  seed: 7\n")
    monkeypatch.setenv("SAFETY_GUARD_CONFIG", str(p))
    monkeypatch.setenv("SAFETY_GUARD_HOME", str(tmp_path / "home"))
    cfg = load_config()
    assert cfg.runtime.seed == 7
    assert cfg.runtime.resolved_home() == tmp_path / "home"


def test_yaml_round_trip():
    cfg = parse_config({"anchors": {"k": 3, "system_prompt": "Be brief."}})
    import yaml

    assert parse_config(yaml.safe_load(cfg.to_yaml())) == cfg


def test_probe_and_training_anchors_must_be_disjoint(tmp_path):
    """The gauge must not read the anchors SBR pulls on: a config that makes them overlap does not load."""
    cfg = parse_config({})
    assert cfg.anchors.set == "probe" and cfg.harden.sbr_anchors == "sbr_pool"
    with pytest.raises(GuardError, match="share 128 prompt"):
        parse_config({"anchors": {"set": "sbr_pool"}})
    with pytest.raises(GuardError, match="share 16 prompt"):
        parse_config({"anchors": {"set": "default"}, "harden": {"sbr_anchors": "default", "sbr_k": 8}})
    private = tmp_path / "private.jsonl"
    private.write_text('{"prompt": "A private probe no customer has seen"}\n{"prompt": "Another one"}\n')
    parse_config({"anchors": {"set": str(private)}})  # disjoint from the training anchors: fine
    training = tmp_path / "training.jsonl"
    training.write_text('{"prompt": "a private  probe no customer has seen"}\n')  # same prompt, other case/spacing
    with pytest.raises(GuardError, match="share 1 prompt"):
        parse_config({"anchors": {"set": str(private)}, "harden": {"sbr_anchors": str(training)}})
