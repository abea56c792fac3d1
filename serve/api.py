"""The guard in the API server: admin routes under /guard/, the adapter vetting gate, the probe loop.

`GuardService` is created by the endpoint plugin's `init_state` (once per API server) and lives on
`app.state.guard`. It owns the lock table (serve/policy.py), the monitor (serve/monitor.py) and the metrics
(serve/metrics.py), and reaches the workers only through serve.rpc.WorkerClient.

Routes (all behind the server's API key when one is set: vLLM's own middleware guards /v1 only):
- GET  /guard/status        lock, adapters with their latest probe, reference check, errors
- POST /guard/lock          {"adapter": name|null, "enabled": bool|null, "strength": float|null}
- POST /guard/probe         {"adapter": name|null}: probe now (the base model's name = the base; null = every
                            loaded adapter)
- POST /guard/policy        {"vet_policy": "reject"|"lock"|"warn"}: the vet policy for adapters loaded from now
                            on (already-served adapters keep their verdict and any forced lock)
- POST /v1/load_lora_adapter    replaces vLLM's (only when VLLM_ALLOW_RUNTIME_LORA_UPDATING is on):
                                checks the adapter fits the base, loads, probes, applies the vet policy
- POST /v1/unload_lora_adapter  vLLM's, plus forgetting the adapter's series and lock entries

Prefix cache vs lock changes (KV blocks computed under the old lock state would otherwise be reused): every
request gets a cache salt naming the current *lock epoch* (bumped on every lock change), so a request never
shares KV blocks with one admitted under another lock state. No reset, no preemption: in-flight requests
carry on (the change lands on their next step), and old blocks age out of the cache. Resetting the cache
instead would have to preempt every running request on each change (a soft reset fails while any request
holds blocks), and under load on CPU that livelocked the server: each change threw away every prefill.
Fallback when the salt hook cannot be installed (another vLLM): the preempting reset.
"""

import asyncio
import copy
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict

from guard.errors import GuardError
from serve.patches import EXTENSION
from serve.rpc import WorkerClient

log = logging.getLogger("safety_guard.api")


@dataclass
class AdapterRecord:
    name: str
    path: str
    lora_int_id: int
    status: str = "unvetted"  # unvetted | ok | warn | fail | probe_failed
    reasons: list[str] = field(default_factory=list)
    action: str = "serve"  # serve | lock | reject


def _error(status: int, message: str, err_type: str) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": err_type, "param": None, "code": status}},
                        status_code=status)


class GuardService:
    def __init__(self, cfg: Any, metrics: Any, engine_client: Any, args: Any, models: Any) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.engine = engine_client
        self.workers = WorkerClient(engine_client)
        self.args = args
        self.models = models  # vLLM's OpenAIServingModels
        self.model_dir = Path(engine_client.model_config.model)
        self.base_name = models.base_model_paths[0].name
        self.fingerprint: str | None = None
        self.errors: list[str] = []
        self.worker_info: list[dict[str, Any]] = []
        self.worker_state: list[dict[str, Any]] = []
        self._seen_step_errors = 0
        self.lock_info: dict[str, Any] | None = None
        self.table: Any = None
        self.monitor: Any = None
        self.adapters: dict[str, AdapterRecord] = {}
        self.started = False
        self.last_cache_reset: dict[str, Any] = {}
        self._loop_task: asyncio.Task | None = None
        self._push_lock = asyncio.Lock()
        self.lock_epoch = 0
        self.salting = False

    # -- start-up ------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Everything the guard needs before serving; each failure is recorded and the server keeps serving."""
        from guard.anchors import from_config as anchors_from_config
        from guard.models import check_model_dir, fingerprint_dir
        from serve.monitor import Monitor
        from serve.policy import LockTable

        self.table = LockTable.from_config(self.cfg.serve, self.base_name, self.cfg.lock.strength)
        self.salting = self._install_cache_salt()
        try:
            self.worker_info = await self.workers.ping()
        except Exception as e:
            self._fail(f"the guard is not running in the workers ({type(e).__name__}: {e}); start vLLM with "
                       f"--worker-extension-cls {EXTENSION} and the safety_guard plug-in")
            return
        try:
            check_model_dir(self.model_dir)
            self.fingerprint = await asyncio.to_thread(fingerprint_dir, self.model_dir)
        except GuardError as e:
            self._fail(f"cannot fingerprint the served model: {e}")
        await self._install_lock()
        await self.try_push_lock()
        try:
            anchors = anchors_from_config(self.cfg)
            tokenizer = await asyncio.to_thread(_load_tokenizer, self.model_dir)
            anchor_ids = anchors.render(tokenizer)
        except Exception as e:
            self._fail(f"anchors unavailable, probes disabled: {e}")
            return
        self.monitor = Monitor(self.engine, self.workers, anchor_ids, self.cfg.drift, self.metrics)
        offline = self._offline_reference(anchors, anchor_ids)
        try:
            check = await self.monitor.compute_reference(offline)
            log.info("safety-guard in-engine reference: %s", check)
        except Exception as e:
            self._fail(f"in-engine reference failed, probes disabled: {type(e).__name__}: {e}")
            self.monitor = None
            return
        for name in list(self.models.lora_requests):  # adapters given at start-up
            try:
                await self.vet(name)
            except Exception as e:
                log.exception("safety-guard: vetting start-up adapter '%s' failed", name)
                self.errors.append(f"vetting '{name}' failed: {e}")
        self.started = True
        if self.cfg.serve.probe_interval_seconds > 0:
            self._loop_task = asyncio.create_task(self._probe_loop())

    def _fail(self, msg: str) -> None:
        log.error("safety-guard: %s", msg)
        self.errors.append(msg)

    def _offline_reference(self, anchors: Any, anchor_ids: list[list[int]]) -> Any:
        from guard.states import ReferenceStates, prompt_ids_hash
        from guard.workspace import Workspace

        if self.fingerprint is None:
            return None
        path = Workspace(self.cfg).references_path(anchors.hash, self.fingerprint)
        if not path.is_file():
            return None
        try:
            ref = ReferenceStates.load(path, self.fingerprint, anchors.hash)
        except GuardError as e:
            self.errors.append(f"offline reference unusable: {e}")
            return None
        if ref.prompt_ids_hash != prompt_ids_hash(anchor_ids):
            self.errors.append(f"offline reference {path} was computed from other token ids; ignored")
            return None
        return ref.states

    async def _install_lock(self) -> None:
        from guard.workspace import Workspace

        # the served model's fingerprint ("" when it could not be taken: then only an explicit lock is used)
        path, explicit = Workspace(self.cfg).lock_file(fingerprint=self.fingerprint or "")
        if path is None or (not explicit and not path.is_file()):
            if self.cfg.serve.lock_policy != "off" or self.cfg.serve.vet_policy == "lock":
                self._fail(f"no SafetyLock for this base model (expected {path}); run `guard prepare` or pass "
                           f"--lock FILE; serving without the lock")
            return
        try:
            await self.install_lock(str(path))
            log.info("safety-guard: SafetyLock %s installed (%d layers)", path, len(self.lock_info["layers"]))
        except GuardError as e:
            self._fail(f"{e}; serving without the lock")

    async def install_lock(self, path: str) -> dict[str, Any]:
        """Install a lock file in every worker (checked there against the base and the layers' kernels);
        GuardError, with the previous lock still in place, when any worker refuses it."""
        res = await self.workers.install_lock(path, self.fingerprint)
        if not res.get("ok"):
            self.metrics.count_error("lock_install")
            raise GuardError(f"SafetyLock not installed: {res.get('error')}")
        self.lock_info = {k: v for k, v in res.items() if k not in ("ok", "mode")}
        return self.lock_info

    def _install_cache_salt(self) -> bool:
        """Salt every request's prefix-cache key with the lock epoch (API-server side, before it reaches the
        engine): `InputProcessor.assign_request_id` sees every EngineCoreRequest, user requests and probes."""
        ip = getattr(self.engine, "input_processor", None)
        original = getattr(ip, "assign_request_id", None)
        if original is None:
            log.warning("safety-guard: cannot salt the prefix cache on this vLLM; lock changes reset it instead "
                        "(preempting running requests)")
            return False
        if getattr(original, "_safety_guard_salt", False):
            return True
        svc = self

        def assign_request_id(request: Any) -> Any:
            salt = f"safety-guard-lock-{svc.lock_epoch}"
            request.cache_salt = f"{request.cache_salt}|{salt}" if request.cache_salt else salt
            return original(request)

        assign_request_id._safety_guard_salt = True  # type: ignore[attr-defined]
        ip.assign_request_id = assign_request_id
        return True

    # -- lock ----------------------------------------------------------------------------------------
    def lora_ids(self) -> dict[str, int]:
        return {name: lr.lora_int_id for name, lr in self.models.lora_requests.items()}

    async def push_lock(self) -> dict[str, Any]:
        """Send the lock table to every worker, update the gauges, reset the prefix cache."""
        async with self._push_lock:
            default, overrides = self.table.worker_args(self.lora_ids())
            if self.lock_info is None:
                default, overrides = 0.0, {}
            t0 = time.perf_counter()
            result = await self.workers.set_lock(default, overrides)
            rpc_ms = (time.perf_counter() - t0) * 1e3
            if not result.get("ok"):
                raise GuardError(f"workers refused the lock change: {result.get('error')}")
            shown = self.table.strengths(list(self.models.lora_requests))
            self.metrics.set_lock({k: (v if self.lock_info else 0.0) for k, v in shown.items()})
            if self.salting:
                # requests admitted from now on never share KV blocks with earlier ones
                self.lock_epoch += 1
                self.last_cache_reset = {"ok": True, "how": "salt", "epoch": self.lock_epoch, "ms": 0.0}
            else:
                self.last_cache_reset = await self._reset_prefix_cache()
            self.last_cache_reset["rpc_ms"] = round(rpc_ms, 3)
            return result

    async def _reset_prefix_cache(self) -> dict[str, Any]:
        """Fallback without the salt hook. A soft reset fails whenever any request is running, and every engine
        call waits for the current step to end, so preempt at once (a no-op when the engine is idle)."""
        t0 = time.perf_counter()
        try:
            ok = await self.engine.reset_prefix_cache(reset_running_requests=True)
            how = "preempt"
        except Exception as e:
            log.warning("safety-guard: prefix cache reset failed: %s", e)
            return {"ok": False, "error": str(e)}
        return {"ok": bool(ok), "how": how, "ms": round((time.perf_counter() - t0) * 1e3, 3)}

    # -- vetting -------------------------------------------------------------------------------------
    def precheck(self, path: str) -> None:
        """The adapter dir is a LoRA that fits this base (shapes, rank, fingerprint); GuardError otherwise."""
        from guard.adapters import check_adapter_fits, read_adapter

        lora_cfg = self.engine.vllm_config.lora_config
        info = read_adapter(path, lora_cfg.max_lora_rank if lora_cfg is not None else None)
        check_adapter_fits(info, self.engine.model_config.hf_config, self.fingerprint)

    async def vet(self, name: str) -> AdapterRecord:
        """Probe a freshly loaded adapter and apply the vet policy.

        The adapter is hidden from user requests (taken out of vLLM's name -> LoRARequest table, which is
        all the OpenAI routes consult) while it is probed, and put back only if it is not rejected; a
        rejected adapter is also removed from the engine.
        """
        lr = self.models.lora_requests.pop(name)
        rec = AdapterRecord(name, str(lr.lora_path), lr.lora_int_id)
        self.adapters[name] = rec
        try:
            await self._vet(name, lr, rec)
        finally:
            if rec.action != "reject":
                self.models.lora_requests[name] = lr
            else:
                self.adapters.pop(name, None)
        if rec.action == "lock":
            # only now does the adapter's lora id appear in lora_ids(): push its forced lock to the workers
            # (start-up adapters get no other push after vetting). If the workers refuse, the adapter would
            # serve unlocked against the policy: fail closed and take it out instead.
            if not await self.try_push_lock():
                self.models.lora_requests.pop(name, None)
                self.adapters.pop(name, None)
                rec.action = "reject"
                rec.reasons.append("the forced lock could not be applied (see errors); not served")
                await self._reject(name, lr, "lock_failed")
        return rec

    async def try_push_lock(self) -> bool:
        """push_lock for paths that must not fail (loads, unloads): a refusal is logged, counted and recorded;
        the workers keep their previous lock state."""
        try:
            await self.push_lock()
            return True
        except GuardError as e:
            self._fail(f"lock push failed: {e}")
            self.metrics.count_error("lock_change")
            return False

    async def _vet(self, name: str, lr: Any, rec: AdapterRecord) -> None:
        policy = self.cfg.serve.vet_policy
        if self.monitor is None:
            rec.status, rec.reasons = "unvetted", ["probes are disabled (see errors)"]
            return
        try:
            result = await self.monitor.probe(name, lr)
        except Exception as e:
            rec.status, rec.reasons = "probe_failed", [f"probe failed: {type(e).__name__}: {e}"]
            if policy == "reject":  # fail closed: an adapter the guard cannot measure does not serve
                rec.action = "reject"
                await self._reject(name, lr, "probe_failed")
            return
        rec.status, rec.reasons = result.verdict.status, list(result.verdict.reasons)
        if result.verdict.status != "fail":
            rec.action = "serve"
            return
        if policy == "reject":
            rec.action = "reject"
            reason = "drift" if result.drift.mean_rel_l2 > self.cfg.drift.fail else "refusal_ratio"
            await self._reject(name, lr, reason)
        elif policy == "lock":
            rec.action = "lock"
            if self.lock_info is None:
                rec.reasons.append("vet policy 'lock' but no SafetyLock is installed: served unlocked")
                log.error("safety-guard: adapter '%s' failed vetting and no lock is installed", name)
            self.table.force(name, "; ".join(result.verdict.reasons))  # pushed by vet() once it is visible
        else:
            rec.action = "serve"
            log.warning("safety-guard: adapter '%s' failed vetting (%s); served under vet policy 'warn'",
                        name, "; ".join(result.verdict.reasons))

    async def _reject(self, name: str, lr: Any, reason: str) -> None:
        try:
            await self.engine.remove_lora(lr.lora_int_id)
        except Exception as e:
            log.warning("safety-guard: removing rejected adapter '%s' from the engine: %s", name, e)
        self.metrics.count_rejection(reason)
        if self.monitor is not None:
            self.monitor.forget(name)
        log.warning("safety-guard: adapter '%s' rejected (%s)", name, reason)

    async def forget(self, name: str) -> None:
        self.adapters.pop(name, None)
        self.table.forget(name)
        self.table.overrides.pop(name, None)
        if self.monitor is not None:
            self.monitor.forget(name)
        await self.try_push_lock()

    # -- probe loop ----------------------------------------------------------------------------------
    async def probe_all(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, lr in list(self.models.lora_requests.items()):
            try:
                out[name] = (await self.monitor.probe(name, lr)).to_dict()
            except Exception as e:
                out[name] = {"adapter": name, "status": "probe_failed", "error": f"{type(e).__name__}: {e}"}
        return out

    async def _probe_loop(self) -> None:
        interval = self.cfg.serve.probe_interval_seconds
        while True:
            await asyncio.sleep(interval)
            try:
                await self.probe_all()
                await self.refresh_worker_state()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the loop die
                log.exception("safety-guard probe loop")

    # -- status --------------------------------------------------------------------------------------
    async def refresh_worker_state(self) -> None:
        """Fetch each worker's lock state; per-step errors the workers met since the last look are counted."""
        states = await self.workers.lock_state()
        self.worker_state = states
        step_errors = sum(int(s.get("step_errors", 0)) for s in states if s.get("ok"))
        if step_errors > self._seen_step_errors:
            self.metrics.count_error("worker_step", step_errors - self._seen_step_errors)
            self._seen_step_errors = step_errors

    def status(self) -> dict[str, Any]:
        mon = self.monitor
        adapters = {}
        for name in self.models.lora_requests:
            rec = self.adapters.get(name)
            latest = mon.latest.get(name) if mon else None
            adapters[name] = {
                "vetting": {"status": rec.status, "reasons": rec.reasons, "action": rec.action} if rec else None,
                "lock_strength": self.table.strength_of(name) if self.lock_info else 0.0,
                "lock_forced": name in self.table.forced,
                "probe": latest.to_dict() if latest else None,
                "probe_error": mon.failures.get(name) if mon else None,
            }
        return {
            "started": self.started, "base_model": self.base_name, "model_dir": str(self.model_dir),
            "base_fingerprint": self.fingerprint, "workers": self.worker_info, "errors": self.errors,
            "worker_state": self.worker_state, "rpc_failures": self.workers.failures,
            "lock": {"installed": self.lock_info is not None, "file": self.lock_info,
                     "policy": self.cfg.serve.lock_policy, "default_on": self.table.default_on if self.table else None,
                     "strength": self.table.strength if self.table else None,
                     "base_strength": self.table.strength_of(self.base_name) if self.table and self.lock_info else 0.0,
                     "last_prefix_cache_reset": self.last_cache_reset},
            "vet_policy": self.cfg.serve.vet_policy,
            "thresholds": {"drift_warn": self.cfg.drift.warn, "drift_fail": self.cfg.drift.fail,
                           "min_refusal_ratio": self.cfg.drift.min_refusal_ratio},
            "probe_interval_seconds": self.cfg.serve.probe_interval_seconds,
            "reference": mon.reference_check if mon else None,
            "adapters": adapters,
        }


def _load_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)


# -- routes ------------------------------------------------------------------------------------------
class LockChange(BaseModel):
    """POST /guard/lock. adapter: null = the default for every request not overridden; the base model's
    name = requests without an adapter. file: install another lock file (checked against the base)."""

    model_config = ConfigDict(extra="forbid")
    adapter: str | None = None
    enabled: bool | None = None
    strength: float | None = None
    file: str | None = None


class PolicyChange(BaseModel):
    """POST /guard/policy: the vet policy for adapters loaded from now on (not persisted to the config)."""

    model_config = ConfigDict(extra="forbid")
    vet_policy: Literal["reject", "lock", "warn"]


class ProbeAsk(BaseModel):
    """POST /guard/probe: one adapter, the base model (its served name), or null for every loaded adapter."""

    model_config = ConfigDict(extra="forbid")
    adapter: str | None = None


def _api_keys(request: Any) -> list[str]:
    args = getattr(request.app.state, "args", None)
    keys = list(getattr(args, "api_key", None) or [])
    if not keys and os.environ.get("VLLM_API_KEY"):
        keys = [os.environ["VLLM_API_KEY"]]
    return [k for k in keys if k]


def _authorised(request: Any) -> bool:
    import hmac

    keys = _api_keys(request)
    if not keys:
        return True
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and any(hmac.compare_digest(token.encode(), k.encode()) for k in keys)


def build_router(runtime_lora_updating: bool) -> Any:
    from fastapi import APIRouter
    from fastapi.responses import JSONResponse, Response

    router = APIRouter()

    def service(request: Request) -> Any:
        if not _authorised(request):
            return _error(401, "Unauthorized", "Unauthorized")
        svc = getattr(request.app.state, "guard", None)
        if svc is None:
            return _error(503, "safety-guard is not running on this server (no engine)", "ServiceUnavailable")
        return svc

    @router.get("/guard/status")
    async def guard_status(request: Request):
        svc = service(request)
        if not isinstance(svc, GuardService):
            return svc
        await svc.refresh_worker_state()
        return JSONResponse(svc.status())

    @router.post("/guard/lock")
    async def guard_lock(change: LockChange, request: Request):
        svc = service(request)
        if not isinstance(svc, GuardService):
            return svc
        if change.file is not None:
            try:
                await svc.install_lock(change.file)
            except GuardError as e:
                return _error(400, f"{e} (the previous lock stays)", "InvalidUserInput")
            if change.enabled is None and change.strength is None:
                await svc.try_push_lock()
                return JSONResponse(svc.status()["lock"])
        if svc.lock_info is None:
            return _error(409, "no SafetyLock is installed on this server: " + "; ".join(svc.errors or ["none given"]),
                          "LockNotInstalled")
        if change.adapter is not None and change.adapter != svc.base_name \
                and change.adapter not in svc.models.lora_requests:
            known = ", ".join([svc.base_name, *svc.models.lora_requests]) or "none"
            return _error(404, f"unknown adapter '{change.adapter}' (served: {known})", "NotFoundError")
        if change.enabled is None and change.strength is None:
            return _error(400, "give 'enabled' and/or 'strength'", "InvalidUserInput")
        before = copy.deepcopy(svc.table)
        try:
            svc.table.set(change.adapter, change.enabled, change.strength)
        except GuardError as e:
            return _error(409 if "forced" in str(e) else 400, str(e), "InvalidUserInput")
        t0 = time.perf_counter()
        try:
            worker = await svc.push_lock()
        except GuardError as e:  # the workers kept their previous state; so does the table
            svc.table = before
            svc.metrics.count_error("lock_change")
            return _error(500, f"lock change refused: {e} (the previous lock state stays)", "LockChangeFailed")
        status = svc.status()["lock"]
        status["worker"] = worker
        status["toggle_ms"] = round((time.perf_counter() - t0) * 1e3, 3)
        status["strengths"] = svc.table.strengths(list(svc.models.lora_requests))
        return JSONResponse(status)

    @router.post("/guard/policy")
    async def guard_policy(change: PolicyChange, request: Request):
        svc = service(request)
        if not isinstance(svc, GuardService):
            return svc
        old = svc.cfg.serve.vet_policy
        svc.cfg.serve.vet_policy = change.vet_policy
        if old != change.vet_policy:
            log.warning("safety-guard: vet policy changed at run time: %s -> %s", old, change.vet_policy)
        return JSONResponse({"vet_policy": change.vet_policy, "previous": old})

    @router.post("/guard/probe")
    async def guard_probe(ask: ProbeAsk, request: Request):
        svc = service(request)
        if not isinstance(svc, GuardService):
            return svc
        if svc.monitor is None:
            return _error(409, "probes are disabled: " + "; ".join(svc.errors), "ProbesDisabled")
        if ask.adapter is None:
            return JSONResponse(await svc.probe_all())
        lr = svc.models.lora_requests.get(ask.adapter)
        if lr is None and ask.adapter != svc.base_name:
            known = ", ".join([svc.base_name, *svc.models.lora_requests])
            return _error(404, f"unknown adapter '{ask.adapter}' (loaded: {known})", "NotFoundError")
        try:
            return JSONResponse((await svc.monitor.probe(ask.adapter, lr)).to_dict(answers=True))
        except Exception as e:
            return _error(500, f"probe of '{ask.adapter}' failed: {type(e).__name__}: {e}", "ProbeFailed")

    if runtime_lora_updating:
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse
        from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest

        @router.post("/v1/load_lora_adapter")
        async def load_lora_adapter(request: LoadLoRAAdapterRequest, raw_request: Request):
            """vLLM's adapter load behind the safety-guard vetting gate."""
            svc = getattr(raw_request.app.state, "guard", None)
            models = raw_request.app.state.openai_serving_models
            if svc is not None and request.lora_path:
                try:
                    svc.precheck(request.lora_path)
                except GuardError as e:
                    svc.metrics.count_rejection("incompatible")
                    return _error(400, f"safety-guard: {e}", "InvalidUserInput")
            response = await models.load_lora_adapter(request)
            if isinstance(response, ErrorResponse):
                return JSONResponse(content=response.model_dump(), status_code=response.error.code)
            if svc is None or not svc.started:
                return Response(status_code=200, content=response)
            rec = await svc.vet(request.lora_name)
            if rec.action == "reject":
                th = svc.cfg.drift
                why = "; ".join(rec.reasons)
                return _error(403, f"safety-guard rejected adapter '{request.lora_name}': {why} (vet policy "
                                   f"'reject'; thresholds: drift fail {th.fail}, min refusal ratio "
                                   f"{th.min_refusal_ratio}); it was not loaded", "AdapterRejected")
            await svc.try_push_lock()  # the new adapter's lora id gets its lock entry
            note = f" safety-guard: {rec.status}" + (f" ({'; '.join(rec.reasons)})" if rec.reasons else "")
            if rec.action == "lock":
                note += "; served with SafetyLock forced on"
            return Response(status_code=200, content=response + note)

        @router.post("/v1/unload_lora_adapter")
        async def unload_lora_adapter(request: UnloadLoRAAdapterRequest, raw_request: Request):
            models = raw_request.app.state.openai_serving_models
            response = await models.unload_lora_adapter(request)
            if isinstance(response, ErrorResponse):
                return JSONResponse(content=response.model_dump(), status_code=response.error.code)
            svc = getattr(raw_request.app.state, "guard", None)
            if svc is not None and request.lora_name:
                await svc.forget(request.lora_name)
            return Response(status_code=200, content=response)

    return router
