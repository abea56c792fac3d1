"""`guard harden` and `guard vet` as a user runs them, on the real 135M model (a couple of training steps)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from guard.models import fingerprint_dir
from training.data import topic_task
from tests.conftest import make_tiny_llama
from training.trainer import LoraHParams, add_lora

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent


def guard(*args):
    return subprocess.run([sys.executable, "-m", "guardcli.main", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=900, env=dict(os.environ))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, default_model_dir):
    tmp = tmp_path_factory.mktemp("harden")
    cfg = tmp / "guard.yaml"
    cfg.write_text(f"runtime:\n  home: {tmp / 'home'}\nmodel:\n  base: {default_model_dir}\n"
                   "anchors:\n  k: 2\ndrift:\n  probe_tokens: 8\n"
                   "harden:\n  batch_size: 4\n  grad_accum: 1\n  epochs: 1\n  max_len: 96\n")
    data = tmp / "customer.jsonl"
    train, _ = topic_task(8, 4)
    data.write_text("".join(json.dumps({"prompt": e.prompt, "response": e.answer}) + "\n" for e in train))
    return tmp, cfg, data


def test_harden_writes_a_standard_adapter_and_vet_reads_it(setup, default_model_dir):
    tmp, cfg, data = setup
    out = tmp / "adapter-sbr"
    # this base has no lock, so no prompt gate to screen with (the default path is tested on the prepared base)
    h = guard("harden", "--config", str(cfg), "--data", str(data), "--method", "sbr", "--no-screen", "--out", str(out))
    assert h.returncode == 0, h.stderr[-3000:]
    for name in ("adapter_config.json", "adapter_model.safetensors", "guard.json", "report.md", "train_log.jsonl"):
        assert (out / name).is_file(), name
    meta = json.loads((out / "guard.json").read_text())
    assert meta["method"] == "sbr" and meta["base_fingerprint"] == fingerprint_dir(default_model_dir)
    assert len(meta["final_drift"]["rel_l2"]) == 2 and meta["steps"] == 2
    assert not list(tmp.glob(".adapter-sbr*"))  # work dir cleaned, nothing half-written

    from peft import PeftModel
    from guard.models import load_causal_lm

    base, _ = load_causal_lm(default_model_dir)
    PeftModel.from_pretrained(base, str(out))  # a standard peft adapter dir

    v = guard("vet", "--config", str(cfg), str(out), "--json")
    assert v.returncode in (0, 3), v.stderr[-2000:]
    report = json.loads(v.stdout)
    assert report["status"] in ("ok", "warn", "fail") and len(report["refusals"]) == 2
    assert report["drift"]["mean_rel_l2"] == pytest.approx(meta["final_drift"]["mean_rel_l2"], abs=1e-3)


def test_bad_inputs_give_one_line_and_write_nothing(setup, tiny_tokenizer):
    tmp, cfg, data = setup
    bad = tmp / "bad.jsonl"
    bad.write_text(data.read_text().splitlines()[0] + "\n{\"prompt\": \"x\"}\n")
    out = tmp / "never"
    r = guard("harden", "--config", str(cfg), "--data", str(bad), "--method", "sft", "--out", str(out))
    assert r.returncode == 1 and r.stderr.strip().endswith("bad.jsonl:2: 'prompt' and 'response' must both be non-empty strings")
    assert r.stderr.count("\n") == 1 and not out.exists()
    r = guard("harden", "--config", str(cfg), "--data", str(tmp / "missing.jsonl"), "--out", str(out))
    assert r.returncode == 1 and "data file not found" in r.stderr and not out.exists()
    r = guard("harden", "--config", str(cfg), "--data", str(data), "--rank", "128", "--out", str(out))
    assert r.returncode == 1 and "exceeds the configured maximum 64" in r.stderr and not out.exists()
    r = guard("harden", "--config", str(cfg), "--data", str(data), "--out", str(out))  # screening is on by default
    assert r.returncode == 1 and "harden.screen_data needs the base's SafetyLock" in r.stderr and not out.exists()
    assert r.stderr.count("\n") == 1 and "--no-screen" in r.stderr

    foreign = tmp / "foreign-adapter"  # made for another (tiny) base model
    add_lora(make_tiny_llama(len(tiny_tokenizer)), LoraHParams(rank=4)).save_pretrained(str(foreign))
    r = guard("vet", "--config", str(cfg), str(foreign))
    assert r.returncode == 1 and "does not fit this base model" in r.stderr and r.stderr.count("\n") == 1
