"""The real default model: conversion, hidden states at the lm_head input, and a miniature `guard prepare`."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from guard.anchors import load_anchor_set
from guard.models import fingerprint_dir, load_causal_lm
from guard.states import ReferenceStates, last_token_states, reference_path

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent


def test_converted_default_model(default_model_dir):
    model, tok = load_causal_lm(default_model_dir, "float32")
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    anchors = load_anchor_set("default", k=2)
    batch = anchors.render(tok)
    assert tok.decode(batch[0]).endswith("<|im_start|>assistant\n")
    with torch.no_grad():
        h = last_token_states(model, batch, tok.pad_token_id)
        logits = model(input_ids=torch.tensor([batch[0]])).logits[0, -1]
    torch.testing.assert_close(model.lm_head(h[:1])[0], logits, atol=1e-4, rtol=1e-4)
    assert len(fingerprint_dir(default_model_dir)) == 64


def test_prepare_end_to_end_and_reuse(mini_prepared):
    """`guard prepare` with a miniature alignment (conftest.mini_prepared); the second run reuses everything."""
    cfg, home = mini_prepared
    aligned = home / "models" / "smollm2-135m-instruct-aligned"
    assert (aligned / "guard_align.json").is_file() and (aligned / "model.safetensors").is_file()
    fp = fingerprint_dir(aligned)
    anchors = load_anchor_set("probe", k=4)  # the probe anchors (anchors.set) are what prepare caches
    ref = ReferenceStates.load(reference_path(home, fp, anchors.hash), fp, anchors.hash, 576)
    assert ref.states.shape == (4, 576)
    from guard.lock import load_lock, lock_path
    from guard.models import ModelShape

    lock = load_lock(lock_path(home, fp), ModelShape(30, 576, 9, 3, 64, 49152), fp)
    assert len(lock.heads) == 4 and lock.biases.abs().sum() > 0
    assert (lock_path(home, fp).with_name(f"{fp[:16]}-report") / "heads.png").is_file()
    mtime = (aligned / "model.safetensors").stat().st_mtime_ns
    lock_mtime = lock_path(home, fp).stat().st_mtime_ns
    second = subprocess.run([sys.executable, "-m", "guardcli.main", "prepare", "--config", str(cfg)],
                            capture_output=True, text=True, cwd=ROOT, timeout=900, env=dict(os.environ))
    assert second.returncode == 0 and "ready in" in second.stdout, second.stderr[-2000:]
    assert (aligned / "model.safetensors").stat().st_mtime_ns == mtime  # reused, not rebuilt
    assert lock_path(home, fp).stat().st_mtime_ns == lock_mtime
    assert not list((home / "models").glob(".*tmp"))  # nothing half-written left behind
