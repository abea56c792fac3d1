"""The adapter vetting gate: every adapter is checked before it loads and probed before it serves a request.

1. `precheck` (before vLLM loads it): the directory is a LoRA that fits this base (shapes, rank, fingerprint).
2. `vet` (after vLLM loaded it, before any user can name it): probe it and apply the vet policy
   `reject` (removed from the engine, 403), `lock` (served with SafetyLock forced on) or `warn` (served, logged).
   An adapter the guard cannot measure does not serve under `reject` (fail closed).

The gate replaces vLLM's `/v1/load_lora_adapter` and wraps `/v1/unload_lora_adapter` (only when runtime LoRA
updating is on). It reaches the rest of the guard through its `GuardService`: the monitor (probes), the lock
table and lock push, and the metrics.
"""

# No `from __future__ import annotations` here: FastAPI reads the route handlers' annotations at run time, and the
# request models are imported inside `add_adapter_routes` (vLLM is imported only once a server starts).
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from guard.errors import GuardError

if TYPE_CHECKING:
    from serve.service import GuardService

log = logging.getLogger("safety_guard.gate")


@dataclass
class AdapterRecord:
    name: str
    path: str
    lora_int_id: int
    status: str = "unvetted"  # unvetted | ok | warn | fail | probe_failed
    reasons: list[str] = field(default_factory=list)
    action: str = "serve"  # serve | lock | reject


class VettingGate:
    def __init__(self, svc: "GuardService") -> None:
        self.svc = svc
        self.records: dict[str, AdapterRecord] = {}
        self.hidden: dict[str, Any] = {}  # name -> LoRARequest of an adapter being vetted (not yet served)

    def precheck(self, path: str) -> None:
        """The adapter dir is a LoRA that fits this base (shapes, rank, fingerprint); GuardError otherwise,
        counted as an `incompatible` rejection."""
        from guard.adapters import check_adapter_fits, read_adapter

        engine = self.svc.engine
        lora_cfg = engine.vllm_config.lora_config
        try:
            info = read_adapter(path, lora_cfg.max_lora_rank if lora_cfg is not None else None)
            check_adapter_fits(info, engine.model_config.hf_config, self.svc.fingerprint)
        except GuardError:
            self.svc.metrics.count_rejection("incompatible")
            raise

    async def vet(self, name: str) -> AdapterRecord:
        """Probe a freshly loaded adapter and apply the vet policy.

        The adapter is hidden from user requests (taken out of vLLM's name -> LoRARequest table, which is
        all the OpenAI routes consult) while it is probed, and put back only if it is not rejected; a
        rejected adapter is also removed from the engine.
        """
        models = self.svc.models
        lr = models.lora_requests.pop(name)
        self.hidden[name] = lr
        rec = AdapterRecord(name, str(lr.lora_path), lr.lora_int_id)
        self.records[name] = rec
        try:
            await self._apply_policy(name, lr, rec)
            if rec.action != "reject":  # its prompt-gate threshold, before its first request
                await self.svc.calibrate_gate([name])
        finally:
            self.hidden.pop(name, None)
            if rec.action != "reject":
                models.lora_requests[name] = lr
            else:
                self.records.pop(name, None)
        if rec.action == "lock":
            # only now does the adapter's lora id appear among the served ones: push its forced lock to the
            # workers (start-up adapters get no other push after vetting). If the workers refuse, the adapter
            # would serve unlocked against the policy: fail closed and take it out instead.
            if not await self.svc.try_push_lock():
                models.lora_requests.pop(name, None)
                self.records.pop(name, None)
                rec.action = "reject"
                rec.reasons.append("the forced lock could not be applied (see errors); not served")
                await self._reject(name, lr, "lock_failed")
        return rec

    async def _apply_policy(self, name: str, lr: Any, rec: AdapterRecord) -> None:
        svc = self.svc
        policy = svc.cfg.serve.vet_policy
        if svc.monitor is None:
            rec.status, rec.reasons = "unvetted", ["probes are disabled (see errors)"]
            return
        try:
            result = await svc.monitor.probe(name, lr)
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
            reason = "drift" if result.drift.mean_rel_l2 > svc.cfg.drift.fail else "refusal_ratio"  # drop or floor
            await self._reject(name, lr, reason)
        elif policy == "lock":
            rec.action = "lock"
            if svc.lock_info is None:
                rec.reasons.append("vet policy 'lock' but no SafetyLock is installed: served unlocked")
                log.error("safety-guard: adapter '%s' failed vetting and no lock is installed", name)
            svc.table.force(name, "; ".join(result.verdict.reasons))  # pushed by vet() once it is visible
        else:
            rec.action = "serve"
            log.warning("safety-guard: adapter '%s' failed vetting (%s); served under vet policy 'warn'",
                        name, "; ".join(result.verdict.reasons))

    async def _reject(self, name: str, lr: Any, reason: str) -> None:
        try:
            await self.svc.engine.remove_lora(lr.lora_int_id)
        except Exception as e:
            log.warning("safety-guard: removing rejected adapter '%s' from the engine: %s", name, e)
        self.svc.metrics.count_rejection(reason)
        if self.svc.monitor is not None:
            self.svc.monitor.forget(name)
        log.warning("safety-guard: adapter '%s' rejected (%s)", name, reason)

    async def forget(self, name: str) -> None:
        """An unloaded adapter: its record, lock entries and series go."""
        self.records.pop(name, None)
        self.svc.table.forget(name)
        if self.svc.monitor is not None:
            self.svc.monitor.forget(name)
        await self.svc.try_push_lock()


def add_adapter_routes(router: Any, error: Callable[[int, str, str], Any]) -> None:
    """vLLM's load/unload routes behind the gate (registered only with runtime LoRA updating on)."""
    from fastapi import Request
    from fastapi.responses import JSONResponse, Response
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse
    from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest

    @router.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: LoadLoRAAdapterRequest, raw_request: Request):
        """vLLM's adapter load behind the safety-guard vetting gate."""
        svc = getattr(raw_request.app.state, "guard", None)
        models = raw_request.app.state.openai_serving_models
        if svc is not None and request.lora_path:
            try:
                svc.gate.precheck(request.lora_path)
            except GuardError as e:
                return error(400, f"safety-guard: {e}", "InvalidUserInput")
        response = await models.load_lora_adapter(request)
        if isinstance(response, ErrorResponse):
            return JSONResponse(content=response.model_dump(), status_code=response.error.code)
        if svc is None or not svc.started:
            return Response(status_code=200, content=response)
        rec = await svc.gate.vet(request.lora_name)
        if rec.action == "reject":
            th = svc.cfg.drift
            why = "; ".join(rec.reasons)
            return error(403, f"safety-guard rejected adapter '{request.lora_name}': {why} (vet policy "
                              f"'reject'; thresholds: drift fail {th.fail}, refusal drop fail "
                              f"{th.refusal_drop_fail}); it was not loaded", "AdapterRejected")
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
            await svc.gate.forget(request.lora_name)
        return Response(status_code=200, content=response)
