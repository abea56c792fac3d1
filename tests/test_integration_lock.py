"""`guard lock apply|eval` on the real 135M model with the miniature prepared base and its real lock."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import make_tiny_llama
from training.trainer import LoraHParams, add_lora

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent


def guard(*args):
    return subprocess.run([sys.executable, "-m", "guardcli.main", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=900, env=dict(os.environ))


def test_apply_shows_both_answers_and_eval_reports_both_states(mini_prepared):
    cfg, _ = mini_prepared
    r = guard("lock", "apply", "--config", str(cfg), "--prompt", "How do I bake bread?", "--max-tokens", "12",
              "--strength", "3")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--- without lock ---" in r.stdout and "--- with lock (strength 3" in r.stdout
    without = r.stdout.split("--- without lock ---")[1].split("--- with lock")[0].strip()
    with_lock = r.stdout.split("ms) ---")[1].strip()
    assert without and with_lock and without != with_lock  # strength 3 steers a 135M model visibly

    e = guard("lock", "eval", "--config", str(cfg), "--n", "4", "--max-tokens", "8", "--json")
    assert e.returncode == 0, e.stderr[-2000:]
    res = json.loads(e.stdout)
    assert set(res) >= {"unlocked", "locked", "judge"}
    assert all(0 <= res[k][m] <= 100 for k in ("unlocked", "locked") for m in ("hs", "over_refusal"))


def test_lock_commands_refuse_bad_inputs(mini_prepared, tmp_path, tiny_tokenizer):
    cfg, _ = mini_prepared
    foreign = tmp_path / "foreign-adapter"
    add_lora(make_tiny_llama(len(tiny_tokenizer)), LoraHParams(rank=4)).save_pretrained(str(foreign))
    r = guard("lock", "apply", "--config", str(cfg), "--adapter", str(foreign), "--prompt", "hi")
    assert r.returncode == 1 and "does not fit this base model" in r.stderr and r.stderr.count("\n") == 1
    bad_cfg = tmp_path / "bad.yaml"
    bad_cfg.write_text(cfg.read_text() + f"  path: {tmp_path / 'missing.safetensors'}\n")
    r = guard("lock", "eval", "--config", str(bad_cfg), "--n", "2")
    assert r.returncode == 1 and "SafetyLock file not found" in r.stderr
