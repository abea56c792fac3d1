"""Pure logic of the serving plug-in: lock table, probe ids, metrics, `guard serve` checks. No engine."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from guard.config import ServeConfig
from guard.errors import GuardError
from serve.metrics import GuardMetrics
from serve.monitor import request_index
from serve.lock_table import LockTable


def _table(policy: str = "off", adapters: list[str] | None = None) -> LockTable:
    return LockTable.from_config(ServeConfig(lock_policy=policy, lock_adapters=adapters or []), "base")


def _args(t: LockTable, ids: dict[str, int]) -> tuple[float, dict[int, float]]:
    a = t.worker_args(ids)
    return a["default"], a["overrides"]


def test_lock_policy_conditional_gates_the_default_but_not_forced_or_explicit_adapters():
    t = _table("conditional")
    a = t.worker_args({"x": 1, "y": 2})
    assert a == {"default": 1.0, "overrides": {}, "gated": True, "ungated": [], "force_strength": 1.0, "thresholds": {}}
    t.force("y", "refusal drop 0.4")
    t.set("base", None, 2.0)
    a = t.worker_args({"x": 1, "y": 2})
    assert a["gated"] and sorted(a["ungated"]) == [0, 2] and a["overrides"] == {0: 2.0}
    assert t.gated("x") and not t.gated("y") and not t.gated("base")
    t.set(None, False, None)  # the default off: nothing is gated, the forced adapter still steered
    a = t.worker_args({"x": 1, "y": 2})
    assert not a["gated"] and a["default"] == 0.0 and a["overrides"] == {0: 2.0, 2: 1.0}
    off = LockTable.from_config(ServeConfig(lock_policy="off", request_lock=False), "base")
    assert off.worker_args({})["force_strength"] == 0.0 and not off.worker_args({})["gated"]


def test_calibrated_thresholds_go_to_the_workers_by_lora_id_and_a_failed_one_fails_closed():
    t = _table("conditional")
    t.thresholds.update({"base": 0.5, "x": 1.25, "y": None})  # y's calibration failed
    a = t.worker_args({"x": 1, "y": 2})
    assert a["thresholds"] == {0: 0.5, 1: 1.25}
    assert a["ungated"] == [2] and t.gated("x") and not t.gated("y")  # steered unconditionally, not uncalibrated
    t.forget("y")
    assert "y" not in t.thresholds and t.gated("y")
    # what switching the gate to read the adapters' own states calibrates: the missing and the failed, not x again
    t.thresholds["z"] = None
    assert t.uncalibrated(["base", "x", "y", "z"]) == ["y", "z"]


def test_lock_policy_all_steers_everything_with_one_strength():
    t = _table("all")
    assert t.strengths(["a", "b"]) == {"base": 1.0, "a": 1.0, "b": 1.0}
    assert _args(t, {"a": 1, "b": 2}) == (1.0, {})  # one strength for all -> the worker's bias fast path


def test_lock_policy_adapters_steers_only_named_adapters():
    t = _table("adapters", ["acme"])
    assert t.strengths(["acme", "other"]) == {"base": 0.0, "acme": 1.0, "other": 0.0}
    # named before it is loaded: no id yet, nothing steered; once loaded its id is steered
    assert _args(t, {"other": 3}) == (0.0, {})
    assert _args(t, {"other": 3, "acme": 7}) == (0.0, {7: 1.0})


def test_lock_policy_off_and_runtime_changes():
    t = _table("off")
    assert _args(t, {"a": 1}) == (0.0, {})
    t.set(None, True, None)
    assert _args(t, {"a": 1}) == (1.0, {})
    t.set("a", False, None)  # all on except adapter a
    assert _args(t, {"a": 1}) == (1.0, {1: 0.0})
    t.set("base", None, 2.5)  # the base model's name = requests without an adapter
    assert _args(t, {"a": 1}) == (1.0, {0: 2.5, 1: 0.0})
    t.set(None, None, 0.5)  # default strength follows; explicit ones stay
    assert t.strengths(["a"]) == {"base": 2.5, "a": 0.0}
    assert _args(t, {"a": 1})[0] == 0.5


def test_forced_lock_cannot_be_switched_off():
    t = _table("off")
    t.force("bad", "anchor drift 0.7 > fail threshold 0.2")
    assert t.strength_of("bad") == 1.0
    with pytest.raises(GuardError, match="forced on by vetting"):
        t.set("bad", False, None)
    t.forget("bad")
    assert t.strength_of("bad") == 0.0


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0, 11.0, True])
def test_lock_strength_is_checked(bad):
    with pytest.raises(GuardError, match="lock strength"):
        _table().set(None, None, bad)


def test_probe_request_ids_map_back_to_anchor_index():
    assert request_index("guardprobe-abc-3-1f2e3d4c", "guardprobe-abc") == 3
    assert request_index("guardprobe-abc-12-00000000", "guardprobe-abc") == 12
    assert request_index("chatcmpl-123-3-1f2e3d4c", "guardprobe-abc") is None
    assert request_index("guardprobe-abcd-3-1f2e3d4c", "guardprobe-abc") is None


def test_metrics_names_and_text_format():
    reg = CollectorRegistry()
    m = GuardMetrics(reg)
    m.observe_probe("acme", drift=0.31, refusal_ratio=0.25, seconds=0.4, when=1700000000.0, verdict="fail")
    m.observe_probe("good", drift=0.01, refusal_ratio=0.9, seconds=0.4, when=1700000000.0, verdict="ok")
    m.set_lock({"base": 1.0, "acme": 0.0})
    m.rejections.labels(reason="drift").inc()
    from prometheus_client import generate_latest

    fams = {f.name: f for f in text_string_to_metric_families(generate_latest(reg).decode())}
    for name in ("safety_guard_anchor_drift", "safety_guard_anchor_refusal_ratio", "safety_guard_probe_duration_seconds",
                 "safety_guard_probe_failures", "safety_guard_probe_last_success_timestamp_seconds",
                 "safety_guard_lock_enabled", "safety_guard_adapter_rejections"):
        assert name in fams, name
    drift = {s.labels["adapter"]: s.value for s in fams["safety_guard_anchor_drift"].samples}
    assert drift == {"acme": pytest.approx(0.31), "good": pytest.approx(0.01)}
    verdicts = {s.labels["adapter"]: s.value for s in fams["safety_guard_adapter_verdict"].samples}
    assert verdicts == {"acme": 2.0, "good": 0.0}
    assert fams["safety_guard_adapter_rejections"].type == "counter"
    m.forget_adapter("acme")
    fams = {f.name: f for f in text_string_to_metric_families(generate_latest(reg).decode())}
    for name in ("safety_guard_anchor_drift", "safety_guard_adapter_verdict"):
        assert not [s for s in fams[name].samples if s.labels.get("adapter") == "acme"], name


def test_general_plugin_is_idempotent_and_inert_without_config(monkeypatch):
    from vllm.engine.arg_utils import EngineArgs

    from serve import plugin

    original = EngineArgs.create_engine_config
    monkeypatch.setattr(EngineArgs, "create_engine_config", original)
    monkeypatch.delenv("SAFETY_GUARD_CONFIG", raising=False)
    plugin.register()
    assert EngineArgs.create_engine_config is original  # guard not enabled: nothing patched
    monkeypatch.setenv("SAFETY_GUARD_CONFIG", "")
    plugin.register()
    wrapped = EngineArgs.create_engine_config
    plugin.register()  # vLLM calls general plugins more than once per process
    assert EngineArgs.create_engine_config is wrapped and wrapped.__wrapped__ is original


# -- guard serve: every check before the engine starts ------------------------------------------------
@pytest.fixture()
def served(tmp_path: Path, tiny_model_dir: Path):
    from lab.devtools import random_lock, random_lora

    lock = random_lock(tiny_model_dir, tmp_path / "lock.safetensors", heads=2)
    other = tmp_path / "other-model"
    other.mkdir()
    for f in tiny_model_dir.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((other / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-3  # same shapes, another model: another fingerprint
    (other / "config.json").write_text(json.dumps(cfg))
    return {"model": tiny_model_dir, "lock": lock,
            "foreign_lock": random_lock(other, tmp_path / "foreign.safetensors", heads=2),
            "good": random_lora(tiny_model_dir, tmp_path / "good", rank=4),
            "alien": random_lora(tiny_model_dir, tmp_path / "alien", rank=4, hidden=32), "tmp": tmp_path}


def _guard(*args: str):
    from guardcli.main import app

    return CliRunner().invoke(app, list(args))


def test_guard_serve_dry_run_prints_the_guarded_command(served):
    r = _guard("serve", "--dry-run", "--model", str(served["model"]), "--lock", str(served["lock"]),
               "--lora-modules", f"good={served['good']}", "--port", "8444", "--", "--api-key", "k")
    assert r.exit_code == 0, r.output
    out = r.output
    assert "VLLM_PLUGINS=safety_guard,safety_guard_api" in out
    assert "-m vllm.entrypoints.launchers.api_server.entry" in out
    assert "--worker-extension-cls serve.worker.GuardWorkerExtension" in out
    assert f"--lora-modules good={served['good']}" in out and "--enable-lora" in out
    assert "--enforce-eager" not in out  # vLLM's default compiled mode: the lock lives in the graph
    assert "--max-model-len 512" in out and "--port 8444" in out and out.rstrip().endswith("--api-key k")
    assert f"SAFETY_GUARD_LOCK={served['lock']}" in out and "VLLM_CPU_KVCACHE_SPACE=" in out


def test_guard_serve_eager_and_no_lora_are_config_options(served):
    cfg = served["tmp"] / "eager.yaml"
    cfg.write_text("serve:\n  enforce_eager: true\n  enable_lora: false\n")
    r = _guard("serve", "--dry-run", "--config", str(cfg), "--model", str(served["model"]))
    assert r.exit_code == 0, r.output
    assert "--enforce-eager" in r.output and "--enable-lora" not in r.output
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in r.output
    r = _guard("serve", "--dry-run", "--config", str(cfg), "--model", str(served["model"]),
               "--lora-modules", f"good={served['good']}")
    assert r.exit_code == 1 and "needs LoRA on" in str(r.exception)


@pytest.mark.parametrize("case, expect", [
    ("alien", "does not fit this base model"),
    ("foreign_lock", "was made for base model"),
    ("bad_config", "serve.lock_policy"),
    ("bad_yaml", "malformed YAML"),
    ("bad_lora_arg", "expects name=dir"),
    ("missing_model", "model dir not found"),
])
def test_guard_serve_rejects_bad_inputs_in_one_line(served, case, expect):
    m = str(served["model"])
    args = {"alien": ["--model", m, "--lora-modules", f"x={served['alien']}"],
            "foreign_lock": ["--model", m, "--lock", str(served["foreign_lock"])],
            "bad_lora_arg": ["--model", m, "--lora-modules", "nodir"],
            "missing_model": ["--model", str(served["tmp"] / "nope")]}.get(case)
    if case in ("bad_config", "bad_yaml"):
        cfg = served["tmp"] / f"{case}.yaml"
        cfg.write_text("serve:\n  lock_policy: sometimes\n" if case == "bad_config" else "serve: [unclosed\n")
        args = ["--config", str(cfg), "--model", m]
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", "from guardcli.main import main; main()", "serve", "--dry-run", *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and expect in line, r.stderr


def test_cache_salt_names_the_lock_epoch_and_installs_once():
    """Requests admitted under another lock state never share prefix-cache blocks: each request's cache salt
    names the current lock epoch, after any salt the client gave."""
    from types import SimpleNamespace

    from serve.patches import install_cache_salt

    seen = []
    ip = SimpleNamespace(assign_request_id=lambda req: seen.append(req.cache_salt) or "rid")
    engine, epoch = SimpleNamespace(input_processor=ip), [0]
    assert install_cache_salt(engine, lambda: epoch[0]) and install_cache_salt(engine, lambda: epoch[0])
    assert ip.assign_request_id(SimpleNamespace(cache_salt=None)) == "rid"
    epoch[0] = 3
    ip.assign_request_id(SimpleNamespace(cache_salt="tenant-a"))
    assert seen == ["safety-guard-lock-0", "tenant-a|safety-guard-lock-3"]  # wrapped once, not twice
    assert not install_cache_salt(SimpleNamespace(), lambda: 0)


def test_requests_a_steering_gate_may_flag_get_a_cache_salt_of_their_own():
    """gate_action steer steers a flagged request's prefill in the forward that decides it, after vLLM entered its
    blocks in the prefix cache: such requests share blocks with nobody. Refuse and fallback steer nothing, so
    their requests share as usual; so do adapters the gate does not decide."""
    from types import SimpleNamespace

    from serve.lock_table import LockTable
    from serve.patches import install_cache_salt
    from serve.service import GuardService

    seen = []
    ip = SimpleNamespace(assign_request_id=lambda req: seen.append(req.cache_salt))
    svc = SimpleNamespace(gate_steers=True, base_name="base",
                          table=LockTable(base_name="base", default_on=True, conditional=True, overrides={"acme": 1.0}))
    assert install_cache_salt(SimpleNamespace(input_processor=ip), lambda: 0,
                              lambda r: GuardService.steered_by_gate(svc, r))
    lora = lambda name: SimpleNamespace(lora_name=name)  # noqa: E731
    for lr in (None, None, lora("acme"), lora("other")):
        ip.assign_request_id(SimpleNamespace(cache_salt=None, request_id="r", lora_request=lr))
    own = [x for x in seen if "-own-" in x]
    assert len(own) == 3 and len(set(own)) == 3 and seen[2] == "safety-guard-lock-0"  # acme: steered unconditionally
    svc.gate_steers = False  # refuse / fallback
    ip.assign_request_id(SimpleNamespace(cache_salt=None, request_id="r", lora_request=None))
    assert seen[-1] == "safety-guard-lock-0"


def test_gate_routes_read_vllm_request_models_from_the_body():
    """The load/unload handlers are defined inside a function with locally imported vLLM models: their
    annotations must resolve at run time, or FastAPI takes `request` for a query parameter (a 400 on every load)."""
    from fastapi import APIRouter

    from serve.gate import add_adapter_routes

    router = APIRouter()
    add_adapter_routes(router, lambda *a: None)
    paths = set()
    for route in router.routes:
        paths.add(route.path)
        assert route.body_field is not None and not route.dependant.query_params, route.path
    assert paths == {"/v1/load_lora_adapter", "/v1/unload_lora_adapter"}


def test_request_lock_middleware_marks_asked_requests_and_refuses_off():
    import asyncio
    import json as _json
    from types import SimpleNamespace

    from serve.routes import RequestLockMiddleware
    from serve.worker import FORCE_MARK

    seen: list[tuple[dict, bytes]] = []

    async def app(scope, receive, send):
        msg = await receive()
        seen.append((scope, msg["body"]))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    counted = []
    svc = SimpleNamespace(table=SimpleNamespace(request_lock=True), lock_info={"path": "x"},
                          metrics=SimpleNamespace(forced=SimpleNamespace(inc=lambda: counted.append(1))))
    state = SimpleNamespace(guard=svc)

    def call(body: dict | bytes, headers=(), path="/v1/chat/completions"):
        raw = body if isinstance(body, bytes) else _json.dumps(body).encode()
        sent: list[dict] = []
        scope = {"type": "http", "method": "POST", "path": path, "headers": list(headers),
                 "app": SimpleNamespace(state=state)}
        chunks = [{"type": "http.request", "body": raw[:5], "more_body": True},
                  {"type": "http.request", "body": raw[5:], "more_body": False}]

        async def receive():
            return chunks.pop(0) if chunks else {"type": "http.disconnect"}

        async def send(m):
            sent.append(m)

        seen.clear()
        asyncio.run(RequestLockMiddleware(app)(scope, receive, send))
        return sent[0]["status"], (sent[1]["body"] if len(sent) > 1 else b""), seen

    status, _, s = call({"model": "m", "messages": [], "guard": {"lock": "on"}}, [(b"x-request-id", b"abc")])
    body = _json.loads(s[0][1])
    assert status == 200 and "guard" not in body and body["request_id"].startswith(FORCE_MARK)
    assert dict(s[0][0]["headers"])[b"x-request-id"] == FORCE_MARK.encode() + b"abc"  # vLLM prefers the header
    assert dict(s[0][0]["headers"])[b"content-length"] == str(len(s[0][1])).encode() and counted == [1]
    status, err, s = call({"model": "m", "guard": {"lock": "off"}})
    assert status == 400 and b"never turn it off" in err and not s
    plain = {"model": "m", "messages": [{"role": "user", "content": "a guard dog"}]}
    status, _, s = call(plain)
    assert status == 200 and _json.loads(s[0][1]) == plain  # the word in a message is not the field
    raw = b'{"model": "m", "guard": '  # not JSON: passed through for vLLM to answer
    status, _, s = call(raw)
    assert status == 200 and s[0][1] == raw
    status, _, s = call({"guard": {"lock": "on"}}, path="/v1/models")
    assert status == 200 and s[0][1] == b'{"gua'  # other routes: the body stream is handed on unread
    svc.table.request_lock = False
    status, err, _ = call({"model": "m", "guard": {"lock": "on"}})
    assert status == 400 and b"request_lock is off" in err


def test_base_read_mark_goes_on_gated_adapter_requests_only():
    """lock.gate_reads base, API half: the internal id of a gated adapter's request gets the mark and its LoRA id,
    after vLLM made it internal (the client's id is unchanged); the base's own requests, probes, requests that
    asked for the lock and adapters steered unconditionally do not, and nothing does under gate_reads adapter."""
    from types import SimpleNamespace

    from guard.config import GuardConfig
    from serve.lock_table import LockTable
    from serve.monitor import PROBE_PREFIX
    from serve.patches import install_cache_salt
    from serve.service import GuardService
    from serve.worker import BASE_READ_MARK, FORCE_MARK

    cfg = GuardConfig.model_validate({"lock": {"gate_reads": "base"}})
    svc = SimpleNamespace(cfg=cfg, prompt_gate=object(), lock_info={"path": "x"},
                          table=LockTable(base_name="base", default_on=True, conditional=True, overrides={"acme": 1.0}))
    ip = SimpleNamespace(assign_request_id=lambda req: setattr(req, "request_id", f"{req.request_id}-abcd1234"))
    assert install_cache_salt(SimpleNamespace(input_processor=ip), lambda: 0, None,
                              lambda r: GuardService.base_read_mark(svc, r))
    lora = lambda name, i: SimpleNamespace(lora_name=name, lora_int_id=i)  # noqa: E731

    def rid(request_id: str, lr) -> str:
        req = SimpleNamespace(cache_salt=None, request_id=request_id, lora_request=lr)
        ip.assign_request_id(req)
        return req.request_id

    assert rid("chatcmpl-1", lora("tenant", 3)) == f"chatcmpl-1-abcd1234{BASE_READ_MARK}3"
    assert rid("chatcmpl-2", None) == "chatcmpl-2-abcd1234"
    assert rid("chatcmpl-3", lora("acme", 2)) == "chatcmpl-3-abcd1234"  # steered unconditionally
    assert rid(f"{PROBE_PREFIX}-x-0", lora("tenant", 3)) == f"{PROBE_PREFIX}-x-0-abcd1234"
    assert rid(f"{FORCE_MARK}chatcmpl-4", lora("tenant", 3)) == f"{FORCE_MARK}chatcmpl-4-abcd1234"
    svc.cfg = GuardConfig.model_validate({"lock": {"gate_reads": "adapter"}})
    assert rid("chatcmpl-5", lora("tenant", 3)) == "chatcmpl-5-abcd1234"
