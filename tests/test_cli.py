"""The `guard` command as a user runs it: a real subprocess, real exit codes, one-line errors."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def guard(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "guardcli.main", *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **(env or {})}, timeout=120)


def test_help_lists_every_command():
    out = guard("--help")
    assert out.returncode == 0
    for cmd in ("prepare", "align", "harden", "vet", "lock", "eval", "serve", "config"):
        assert cmd in out.stdout
    lock = guard("lock", "--help")
    assert lock.returncode == 0 and all(c in lock.stdout for c in ("build", "apply", "eval"))


def test_config_show_and_one_line_errors(tmp_path):
    good = tmp_path / "g.yaml"
    good.write_text("drift:\n  warn: 0.05\n")
    out = guard("config", "show", "--config", str(good))
    assert out.returncode == 0 and "warn: 0.05" in out.stdout and "fail: 0.3" in out.stdout
    bad = tmp_path / "b.yaml"
    bad.write_text("drift:\n  wran: 0.05\n")
    out = guard("config", "check", "--config", str(bad))
    assert out.returncode == 1
    assert out.stderr.strip() == f"error: {bad}: drift.wran: unknown key"
    out = guard("config", "show", env={"SAFETY_GUARD_CONFIG": str(tmp_path / "missing.yaml")})
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "config file not found" in out.stderr


def test_harden_flags_reach_the_harden_section(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "Hi", "response": "Hello"}\n')
    out = guard("harden", "--data", str(data), "--out", str(tmp_path / "o"), "-k", "0")
    assert out.returncode == 1 and "harden.sbr_k" in out.stderr and out.stderr.count("\n") == 1  # not anchors.k
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"runtime:\n  home: {tmp_path / 'home'}\nmodel:\n  base: {tmp_path / 'no-base'}\n")
    out = guard("harden", "--data", str(data), "--out", str(tmp_path / "o"), "--screen", "--config", str(cfg))
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "no such option" not in out.stderr.lower()
