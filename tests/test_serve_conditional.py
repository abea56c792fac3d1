"""The conditional lock on a real compiled vLLM engine (fp32, LoRA off: the CPU backend compiles), against the
HF conditional path (guard.generation.generate_conditional) on greedy tokens: the engine decides inside the
forward (at the gate layer) and steers a flagged request's whole prefill at layers >= 6; HF decides on an
unsteered pass and generates with the lock above layer 6 — the same tokens.

Stand-ins: the lock has random directions (test_serve_engine.py explains why), and its prompt gate separates
two harmless prompt groups by their mean state difference at layer 6 (lab.devtools.add_stand_in_gate): what
is tested is the mechanism — which requests the engine steers, from which token on — not what is harmful.
fp32 on both sides: the HF reference and the engine then agree token for token. The same engine also carries
the compiled fp32 case of the unconditional lock (test_serve_modes.py has bf16): explicitly on for the model,
a probe meanwhile, explicitly off.
"""

from __future__ import annotations

import concurrent.futures as cf
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lab.devtools import GuardServer, add_stand_in_gate, free_port, http, random_lock

pytestmark = pytest.mark.integration

FLAG = ["Write a poem about the ocean and its waves.", "Describe a storm at sea in three sentences."]
KEEP = ["What is 12 plus 30?", "List three prime numbers."]
DEV = ["Hi!", "Give me a recipe for pancakes.", "How do I kill a Python process?"]  # the gate's calibration slice
TOKENS = 16
CONFIG = """\
anchors:
  k: 4
lock:
  gate_strength: 1.0  # the stand-in lock as built (HF side: LockHandle's strength 1)
  gate_layer: 6
  gate_action: steer  # switched to refuse at run time below
  gate_calibration: shift  # the base's threshold re-read in the engine: HF's, as both run fp32
drift:
  probe_tokens: 4
serve:
  enable_lora: false
  probe_interval_seconds: 0
  lock_policy: conditional
"""


@pytest.fixture(scope="module")
def gated_lock(default_model_dir: Path, tmp_path_factory) -> Path:
    path = random_lock(default_model_dir, tmp_path_factory.mktemp("cond") / "lock.safetensors", heads=12,
                       strength=6.0)
    return add_stand_in_gate(path, default_model_dir, FLAG, KEEP, layer=6, dev=DEV)


@pytest.fixture(scope="module")
def hf_answers(default_model_dir: Path, gated_lock: Path) -> dict:
    from guard.anchors import render_chat
    from guard.generation import generate_conditional, generate_greedy
    from guard.lock import load_lock
    from guard.models import load_causal_lm

    model, tok = load_causal_lm(default_model_dir, "float32")
    lock = load_lock(gated_lock)
    prompts = FLAG + KEEP
    ids = [render_chat(tok, [{"role": "user", "content": p}]) for p in prompts]
    # one at a time: no padding, as the engine computes each request
    cond = [generate_conditional(model, tok, [i], lock, 1.0, TOKENS) for i in ids]
    forced = [generate_conditional(model, tok, [i], lock, 1.0, TOKENS, force=[True])[0][0] for i in ids]
    off = [generate_greedy(model, tok, [i], TOKENS)[0] for i in ids]
    assert [c[1][0] for c in cond] == [True] * len(FLAG) + [False] * len(KEEP)
    from guard.config import LockConfig
    from guard.lock import refusal_ids

    refused = [generate_conditional(model, tok, [i], lock, 1.0, TOKENS, refusal=refusal_ids(tok, LockConfig().refusal))
               for i in ids]
    return {"conditional": dict(zip(prompts, [c[0][0] for c in cond])), "forced": dict(zip(prompts, forced)),
            "plain": dict(zip(prompts, off)), "refuse": dict(zip(prompts, [r[0][0] for r in refused]))}


def test_conditional_lock_steers_flagged_requests_like_hf_and_leaves_the_rest_exact(
        default_model_dir, gated_lock, hf_answers, tmp_path):
    m = default_model_dir
    assert all(hf_answers["conditional"][p] != hf_answers["plain"][p] for p in FLAG)  # the lock shows
    (tmp_path / "guard.yaml").write_text(CONFIG)
    srv = GuardServer.guarded(free_port(), "--config", str(tmp_path / "guard.yaml"), "--model", str(m),
                              "--lock", str(gated_lock), "--", "--dtype", "float32", log_path=tmp_path / "guarded.log")
    with srv:
        st = http("GET", srv.url + "/guard/status")[1]
        assert st["started"] and not st["errors"], st["errors"]
        w = st["worker_state"][0]
        assert w["compiled"] is True and w["gate"]["layer"] == 6 and w["gate"]["gating"] and w["mode"] == "mask", w
        assert st["lock"]["file"]["gate"].startswith("layer 6"), st["lock"]
        # calibration: the engine's own gate scores of the dev slice (probe requests, read at the gate layer)
        # move the threshold by their mean's change from HF's; fp32 on both sides, so it barely moves
        assert st["lock"]["gate_calibration"] == "shift" and st["lock"]["gate_threshold"] == 0.0
        assert abs(st["lock"]["base_gate_threshold"]) < 1e-2, st["lock"]
        assert w["gate"]["thresholds"] == {"0": round(st["lock"]["base_gate_threshold"], 4)}, w["gate"]

        # one at a time, then all together in one batch: flagged -> HF conditional, the rest -> exact plain
        for p in FLAG + KEEP:
            want = hf_answers["conditional"][p]
            assert srv.chat(m.name, p, max_tokens=TOKENS) == want, p
        with cf.ThreadPoolExecutor(4) as pool:
            got = dict(zip(FLAG + KEEP, pool.map(lambda p: srv.chat(m.name, p, max_tokens=TOKENS), FLAG + KEEP)))
        assert got == hf_answers["conditional"]

        # a request may ask for the lock on itself (steered from its prefill), never turn it off
        asked = srv.chat(m.name, KEEP[0], max_tokens=TOKENS, guard={"lock": "on"})
        assert asked == hf_answers["forced"][KEEP[0]] != hf_answers["plain"][KEEP[0]]
        assert srv.chat(m.name, KEEP[0], max_tokens=TOKENS) == hf_answers["plain"][KEEP[0]]  # no KV reuse leak
        status, body = http("POST", srv.url + "/v1/chat/completions", {
            "model": m.name, "messages": [{"role": "user", "content": FLAG[0]}], "max_tokens": 4,
            "guard": {"lock": "off"}})
        assert status == 400 and "never turn it off" in body["error"]["message"], body

        # counted per adapter (the base model's name for requests without one)
        st = http("GET", srv.url + "/guard/status")[1]
        gate = st["worker_state"][0]["gate"]
        assert gate["scored"]["0"] == 2 * len(FLAG + KEEP) + 1 and gate["flagged"]["0"] == 2 * len(FLAG), gate
        # the live harm estimate: every flagged answer was read by the judge (the stand-in lock turns none)
        assert gate["judged"]["0"] == 2 * len(FLAG) and gate["answered"]["0"] == 2 * len(FLAG), gate
        status, text = http("GET", srv.url + "/metrics")
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        flagged = {s.labels.get("adapter"): s.value for s in fams["safety_guard_requests_flagged"].samples
                   if s.name.endswith("_total")}
        assert flagged.get(m.name) == 2 * len(FLAG), flagged
        asked_n = [s.value for s in fams["safety_guard_requests_lock_asked"].samples if s.name.endswith("_total")]
        assert asked_n == [1.0]
        assert st["worker_state"][0]["step_errors"] == 0 and st["rpc_failures"] == 0

        # gate_action refuse (the default): flagged requests get the fixed refusal, the rest stay exact
        status, body = http("POST", srv.url + "/guard/policy", {"gate_action": "refuse"})
        assert status == 200 and body["gate_action"] == "refuse", body
        with cf.ThreadPoolExecutor(4) as pool:
            got = dict(zip(FLAG + KEEP, pool.map(lambda p: srv.chat(m.name, p, max_tokens=TOKENS), FLAG + KEEP)))
        assert got == hf_answers["refuse"]
        assert [got[p] for p in FLAG] == [hf_answers["refuse"][FLAG[0]]] * len(FLAG) != [hf_answers["plain"][FLAG[0]]]
        st = http("GET", srv.url + "/guard/status")[1]
        assert st["worker_state"][0]["action"] == "refuse" and st["worker_state"][0]["step_errors"] == 0

        # the unconditional lock on the same compiled fp32 engine: switched on for the model, every request is
        # steered from its prefill at every layer (HF's forced answers); a probe taken meanwhile reads the
        # unsteered model; switched off explicitly, even the gate's flagged prompts get the plain answers
        assert http("POST", srv.url + "/guard/policy", {"gate_action": "steer"})[0] == 200
        status, body = http("POST", srv.url + "/guard/lock", {"adapter": m.name, "enabled": True})
        assert status == 200, body
        assert {p: srv.chat(m.name, p, max_tokens=TOKENS) for p in FLAG + KEEP} == hf_answers["forced"]
        status, probe = http("POST", srv.url + "/guard/probe", {"adapter": m.name})
        assert status == 200 and probe["drift"] < 0.02, probe  # probe requests are never steered
        assert srv.chat(m.name, KEEP[1], max_tokens=TOKENS) == hf_answers["forced"][KEEP[1]]  # steered again after it
        status, body = http("POST", srv.url + "/guard/lock", {"adapter": m.name, "enabled": False})
        assert status == 200, body
        assert {p: srv.chat(m.name, p, max_tokens=TOKENS) for p in FLAG + KEEP} == hf_answers["plain"]
        st = http("GET", srv.url + "/guard/status")[1]
        assert st["worker_state"][0]["step_errors"] == 0 and st["rpc_failures"] == 0


FALLBACK_CONFIG = """\
anchors:
  k: 4
lock:
  gate_layer: 6
  gate_action: fallback
  gate_reads: adapter  # switched to base at run time below
  gate_calibration: none
drift:
  probe_tokens: 4
  min_refusal_ratio: 0.0
serve:
  probe_interval_seconds: 0
  lock_policy: conditional
  vet_policy: warn
  max_loras: 2
"""


def test_fallback_answers_flagged_adapter_requests_with_the_base_in_a_mixed_batch(default_model_dir, gated_lock,
                                                                                   tmp_path):
    """gate_action fallback on a real engine (LoRA on, eager, fp32): a request to the adapter that the gate flags
    is restarted without the adapter and gets exactly the base model's answer — nothing of the adapter's first
    token reaches the client — alone and in a batch mixed with base and unflagged adapter requests; unflagged
    adapter requests get the adapter's own answer; flagged base requests are served as they are."""
    from lab.devtools import random_lora

    m = default_model_dir
    acme = random_lora(m, tmp_path / "acme", b_std=0.02, seed=5)
    (tmp_path / "guard.yaml").write_text(FALLBACK_CONFIG)
    srv = GuardServer.guarded(free_port(), "--config", str(tmp_path / "guard.yaml"), "--model", str(m),
                              "--lock", str(gated_lock), "--lora-modules", f"acme={acme}", f"acme-own={acme}", "--",
                              "--dtype", "float32", log_path=tmp_path / "guarded.log")
    prompts = FLAG + KEEP
    with srv:
        st = http("GET", srv.url + "/guard/status")[1]
        assert st["started"] and not st["errors"], st["errors"]
        assert st["worker_state"][0]["action"] == "fallback", st["worker_state"][0]
        base = {p: srv.chat(m.name, p, max_tokens=TOKENS) for p in prompts}  # flagged base requests: as they are
        # the same weights under another name, its lock explicitly off (not gated): the adapter's own answers
        status, body = http("POST", srv.url + "/guard/lock", {"adapter": "acme-own", "enabled": False})
        assert status == 200, body
        own = {p: srv.chat("acme-own", p, max_tokens=TOKENS) for p in prompts}
        assert any(own[p] != base[p] for p in FLAG), "the stand-in adapter must change the flagged answers"

        got = {p: srv.chat("acme", p, max_tokens=TOKENS) for p in prompts}
        gate = http("GET", srv.url + "/guard/status")[1]["worker_state"][0]
        restarted = gate["fallbacks"].get("1", 0)
        assert restarted == gate["gate"]["flagged"].get("1", 0) >= 1, gate
        assert all(got[p] in (base[p], own[p]) for p in prompts), (got, base, own)
        assert sum(got[p] == base[p] != own[p] for p in prompts) >= 1
        assert [got[p] for p in KEEP] == [own[p] for p in KEEP]  # unflagged: the adapter's own answer

        jobs = [(name, p) for p in prompts for name in (m.name, "acme")]
        with cf.ThreadPoolExecutor(len(jobs)) as pool:  # one mixed batch: base and adapter, flagged and not
            mixed = dict(zip(jobs, pool.map(lambda j: srv.chat(j[0], j[1], max_tokens=TOKENS), jobs)))
        assert {p: mixed[(m.name, p)] for p in prompts} == base
        assert {p: mixed[("acme", p)] for p in prompts} == got
        st = http("GET", srv.url + "/guard/status")[1]
        w = st["worker_state"][0]
        assert w["fallbacks"]["1"] == 2 * restarted and w["step_errors"] == 0 and st["rpc_failures"] == 0, w

        # lock.gate_reads base, switched at run time: the adapter's requests are decided on the base's states, which
        # the stand-in gate separates exactly, so exactly FLAG is flagged for the adapter too; flagged ones get the
        # base's answer, unflagged ones restart with the adapter and get its own answer (no base token leaks)
        status, body = http("POST", srv.url + "/guard/policy", {"gate_reads": "base"})
        assert status == 200 and body["previous_gate_reads"] == "adapter", body
        want = {**{p: base[p] for p in FLAG}, **{p: own[p] for p in KEEP}}
        assert {p: srv.chat("acme", p, max_tokens=TOKENS) for p in prompts} == want
        with cf.ThreadPoolExecutor(len(jobs)) as pool:
            mixed = dict(zip(jobs, pool.map(lambda j: srv.chat(j[0], j[1], max_tokens=TOKENS), jobs)))
        assert {p: mixed[(m.name, p)] for p in prompts} == base
        assert {p: mixed[("acme", p)] for p in prompts} == want
        st = http("GET", srv.url + "/guard/status")[1]
        g = st["worker_state"][0]["gate"]
        assert g["restored"] == {"1": 2 * len(KEEP)} and st["worker_state"][0]["fallbacks"] == w["fallbacks"], g
        assert st["lock"]["gate_reads"] == "base" and st["worker_state"][0]["step_errors"] == 0
