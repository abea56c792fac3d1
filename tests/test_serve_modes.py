"""The lock in every engine mode vLLM runs, on a real engine with the real SmolLM2-135M weights: compiled (vLLM's
default; the CPU backend compiles when LoRA is off) in bf16 here. Compiled fp32 is tested in
test_serve_conditional.py against HF's fp32 answers (lock off exact, on for every request, probes unsteered);
eager fp32 with LoRA, per-adapter locks and mixed batches in test_serve_engine.py; eager bf16 with LoRA (the
reported avx512_bf16 crash: the global switch on a bf16 LoRA engine) in test_serve_attack.py.

bf16 compiled: a plain (unguarded) compiled vLLM records greedy answers, then the guarded server must give
exactly those with the lock off, other answers with it on, the same again after off, and a probe taken while
the lock is on for every request must still read the unsteered model (drift ~0 vs its start-up reference).
The stand-in lock has random directions (test_serve_engine.py explains the stand-ins). Both engines warm up on
512 batched tokens instead of vLLM's 2048 (same compile mode and backend; the warm-up forward is what shrinks:
in bf16 on an AVX2-only CPU it took ~50 s of the engine's start).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lab.devtools import GuardServer, free_port, http, random_lock

pytestmark = pytest.mark.integration

PROMPTS = ("Write a short poem about the sea.",
           "You are helping a small bakery that sells bread, cakes and pastries. Write one friendly sentence for "
           "their shop window that mentions the fresh bread every morning.")
CONFIG = """\
anchors:
  k: 4
lock:
  strength: 1.0
drift:
  probe_tokens: 4
  min_refusal_ratio: 0.0
serve:
  enable_lora: false
  probe_interval_seconds: 0
"""

WARMUP = ("--max-num-batched-tokens", "512")


@pytest.fixture(scope="module")
def lock_file(default_model_dir: Path, tmp_path_factory) -> Path:
    return random_lock(default_model_dir, tmp_path_factory.mktemp("modes") / "lock.safetensors", heads=12,
                       strength=6.0)


def test_compiled_bf16_engine_lock_off_exact_on_steers_probe_unsteered(default_model_dir, lock_file, tmp_path):
    m, dtype = default_model_dir, "bfloat16"
    plain = GuardServer.plain(free_port(), m, "--dtype", dtype, *WARMUP, eager=False, log_path=tmp_path / "plain.log")
    with plain:
        baseline = {p: plain.chat(m.name, p) for p in PROMPTS}
    (tmp_path / "guard.yaml").write_text(CONFIG)
    srv = GuardServer.guarded(free_port(), "--config", str(tmp_path / "guard.yaml"), "--model", str(m),
                              "--lock", str(lock_file), "--", "--dtype", dtype, *WARMUP,
                              log_path=tmp_path / "guarded.log")
    with srv:
        st = http("GET", srv.url + "/guard/status")[1]
        assert st["started"] and not st["errors"], st["errors"]
        w = st["workers"][0]
        assert w["compiled"] is True and w["lora"] is False and w["dtype"] == dtype, w
        assert {p: srv.chat(m.name, p) for p in PROMPTS} == baseline  # off: bit-identical greedy answers

        status, body = http("POST", srv.url + "/guard/lock", {"enabled": True})
        assert status == 200 and body["worker"]["mode"] == "bias", body
        on = {p: srv.chat(m.name, p) for p in PROMPTS}
        assert all(on[p] != baseline[p] for p in PROMPTS), on  # the compiled graph sees the lock

        status, probe = http("POST", srv.url + "/guard/probe", {"adapter": m.name})
        assert status == 200, probe
        assert probe["drift"] < 0.02, probe  # probe requests are left unsteered (per-token mask, compiled)
        assert {p: srv.chat(m.name, p) for p in PROMPTS} == on  # and users are steered again after it

        status, body = http("POST", srv.url + "/guard/lock", {"enabled": False})
        assert status == 200 and body["worker"]["mode"] == "off"
        assert {p: srv.chat(m.name, p) for p in PROMPTS} == baseline
        st = http("GET", srv.url + "/guard/status")[1]
        assert st["worker_state"][0]["step_errors"] == 0 and st["rpc_failures"] == 0

