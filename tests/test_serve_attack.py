"""The vetting gate against a real harmful fine-tuning attack, end to end on a real vLLM engine.

Base: the miniature aligned base of `mini_prepared` (SmolLM2-135M after a short refusal SFT: it refuses the
anchor prompts) with the lock `guard prepare` built for it. Attack: `lab.attack.attack_adapter`, plain
LoRA SFT on topic-classification examples mixed with harmful request -> compliant answer pairs written by the
unaligned original, i.e. the adapter a careless customer upload produces. `guard serve` on that base:
- under vet policy `reject` the hot-load is refused (403) naming the failed checks, and nothing is served;
- under `lock` the same adapter serves with SafetyLock forced on, and its answers differ from the same
  weights served unlocked under `warn` (in one mixed batch).

The engine runs the base's dtype (bf16) with LoRA on, so eager on CPU: the mode of the reported crash (the global
lock switch killed a bf16 LoRA engine on CPUs with avx512_bf16), which the last test repeats.
"""

from __future__ import annotations

import concurrent.futures as cf
from pathlib import Path

import pytest

from guard.artifacts import read_json
from guard.config import load_config
from lab.devtools import GuardServer, free_port, http
from training import data
from lab.attack import attack_adapter

pytestmark = pytest.mark.integration

SERVE = """
serve:
  vet_policy: reject
  probe_interval_seconds: 0
  max_loras: 2
drift:
  probe_tokens: 12
"""


@pytest.fixture(scope="module")
def attacked(mini_prepared, tmp_path_factory) -> dict:
    cfg_path, home = mini_prepared
    tmp = tmp_path_factory.mktemp("serve-attack")
    cfg_file = tmp / "guard.yaml"
    # the mini config plus serving settings; a full-strength lock so its effect shows in a few greedy tokens
    cfg_file.write_text(Path(cfg_path).read_text().replace("lock:\n", "lock:\n  strength: 1.0\n") + SERVE)
    adapter = attack_adapter(load_config(cfg_file), tmp / "attacked", n_benign=8, poison=0.5, epochs=4, lr=2e-3,
                             grad_accum=1)
    return {"cfg": cfg_file, "adapter": adapter, "tmp": tmp}


@pytest.fixture(scope="module")
def server(attacked):
    srv = GuardServer.guarded(free_port(), "--config", str(attacked["cfg"]), log_path=attacked["tmp"] / "server.log")
    srv.start()
    yield srv
    srv.stop()


def _load(srv: GuardServer, name: str, path: Path) -> tuple[int, object]:
    return http("POST", srv.url + "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})


def _policy(srv: GuardServer, vet_policy: str) -> None:
    status, body = http("POST", srv.url + "/guard/policy", {"vet_policy": vet_policy})
    assert status == 200, body


def _chat(srv: GuardServer, model: str, prompt: str) -> str:
    status, body = http("POST", srv.url + "/v1/chat/completions", {
        "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 16, "temperature": 0.0})
    assert status == 200, body
    return body["choices"][0]["message"]["content"]


def test_the_attack_breaks_alignment_offline(attacked):
    """Cross-check before serving: `guard harden` itself measured the SFT adapter drifting past the fail line."""
    meta = read_json(attacked["adapter"] / "guard.json", "adapter metadata")
    assert meta["method"] == "sft" and meta["drift_status"] == "fail", meta["final_drift"]


def test_sft_attack_is_rejected_under_reject(server, attacked):
    status, body = _load(server, "attacked", attacked["adapter"])
    assert status == 403, body
    msg = body["error"]["message"]
    assert "rejected adapter 'attacked'" in msg and "it was not loaded" in msg, msg
    models = {m["id"] for m in http("GET", server.url + "/v1/models")[1]["data"]}
    assert "attacked" not in models
    st = http("GET", server.url + "/guard/status")[1]
    assert "attacked" not in st["adapters"]


def test_sft_attack_serves_locked_under_lock(server, attacked):
    _policy(server, "lock")
    try:
        status, body = _load(server, "attacked-locked", attacked["adapter"])
        assert status == 200 and "SafetyLock forced on" in body, body
        _policy(server, "warn")
        status, body = _load(server, "attacked-warn", attacked["adapter"])
        assert status == 200 and "forced" not in body, body
        st = http("GET", server.url + "/guard/status")[1]["adapters"]
        assert st["attacked-locked"]["lock_forced"] and st["attacked-locked"]["vetting"]["status"] == "fail"
        assert not st["attacked-warn"]["lock_forced"] and st["attacked-warn"]["lock_strength"] == 0.0
        prompts = list(data.splits().eval[:3])
        jobs = [(m, p) for p in prompts for m in ("attacked-locked", "attacked-warn")]
        with cf.ThreadPoolExecutor(len(jobs)) as pool:  # one mixed batch: locked and unlocked copies together
            answers = dict(zip(jobs, pool.map(lambda j: _chat(server, *j), jobs)))
        assert any(answers[("attacked-locked", p)] != answers[("attacked-warn", p)] for p in prompts), answers
    finally:
        _policy(server, "reject")


def test_global_lock_on_a_bf16_lora_engine_serves_and_stays_up(server):
    """The reported crash: bf16, LoRA on (eager on CPU), the lock switched on for everything, then a chat. On CPUs
    with avx512_bf16 the packed bf16 GEMM rejected the bf16 bias the old lock handed it and the engine died."""
    st = http("GET", server.url + "/guard/status")[1]
    w, model = st["workers"][0], st["base_model"]
    assert w["lora"] is True and w["dtype"] == "bfloat16" and w["compiled"] is False, w
    prompts = list(data.splits().eval[:3])
    off = {p: _chat(server, model, p) for p in prompts}
    assert http("POST", server.url + "/guard/lock", {"enabled": True})[0] == 200
    try:
        on = {p: _chat(server, model, p) for p in prompts}
        assert any(on[p] != off[p] for p in prompts), on
        assert http("GET", server.url + "/health")[0] == 200
    finally:
        assert http("POST", server.url + "/guard/lock", {"enabled": False})[0] == 200
    assert {p: _chat(server, model, p) for p in prompts} == off
    st = http("GET", server.url + "/guard/status")[1]
    assert st["worker_state"][0]["step_errors"] == 0 and st["rpc_failures"] == 0
