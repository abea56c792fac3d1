"""guard.workspace: one answer to "which base / original / references / lock", with one precedence order."""

from __future__ import annotations

from pathlib import Path

import pytest

from guard.config import GuardConfig
from guard.errors import GuardError
from guard.workspace import LOCK_ENV, Workspace


def ws_with(tmp_path: Path, **model) -> Workspace:
    cfg = GuardConfig.model_validate({"runtime": {"home": str(tmp_path / "home")}, "model": model})
    return Workspace(cfg)


def test_unprepared_base_is_a_clear_error(tmp_path):
    with pytest.raises(GuardError, match="run `guard prepare` first"):
        ws_with(tmp_path).base()
    assert ws_with(tmp_path).base_target() == tmp_path / "home" / "models" / "smollm2-135m-instruct-aligned"


def test_configured_base_wins_and_keys_references_and_lock(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.delenv(LOCK_ENV, raising=False)
    ws = ws_with(tmp_path, base=str(tiny_model_dir))
    assert ws.base() == tiny_model_dir
    fp = ws.base_fingerprint
    lock, explicit = ws.lock_file()
    assert not explicit and lock == tmp_path / "home" / "locks" / f"{fp[:16]}.safetensors"
    assert ws.references_path("a" * 64).name == f"{fp[:16]}-{'a' * 16}.safetensors"
    assert ws.lock_file(fingerprint="") == (None, False)  # unknown served model: no prepared lock


def test_lock_precedence_argument_env_config_prepared(tmp_path, tiny_model_dir, monkeypatch):
    ws = ws_with(tmp_path, base=str(tiny_model_dir))
    ws.cfg.lock.path = tmp_path / "from-config.safetensors"
    monkeypatch.setenv(LOCK_ENV, str(tmp_path / "from-env.safetensors"))
    assert ws.lock_file(tmp_path / "arg.safetensors") == (tmp_path / "arg.safetensors", True)
    assert ws.lock_file() == (tmp_path / "from-env.safetensors", True)
    monkeypatch.delenv(LOCK_ENV)
    assert ws.lock_file() == (tmp_path / "from-config.safetensors", True)
