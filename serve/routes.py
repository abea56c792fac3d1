"""The guard's HTTP surface: `/guard/*` admin routes, request models, auth.

Routes (all behind the server's API key when one is set: vLLM's own middleware guards /v1 only):
- GET  /guard/status        lock, adapters with their latest probe, reference check, errors
- POST /guard/lock          {"adapter": name|null, "enabled": bool|null, "strength": float|null, "file": path|null}
- POST /guard/probe         {"adapter": name|null}: probe now (the base model's name = the base; null = every
                            loaded adapter)
- POST /guard/policy        {"vet_policy": "reject"|"lock"|"warn", "gate_action": "refuse"|"steer"|"fallback",
                            "gate_reads": "adapter"|"base"} (any of them): the vet policy for adapters loaded from
                            now on (already-served adapters keep their verdict and any forced lock); what the
                            conditional lock does with flagged requests; whose states its gate reads (to
                            `adapter`: adapters without a threshold of their own are calibrated before the answer)
- POST /v1/load_lora_adapter, /v1/unload_lora_adapter: vLLM's, behind the vetting gate (serve/gate.py), when
                            VLLM_ALLOW_RUNTIME_LORA_UPDATING is on

Errors use the OpenAI error shape, so clients of the OpenAI endpoint parse them as they parse vLLM's.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from typing import Any, Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict

from guard.errors import GuardError
from serve.gate import add_adapter_routes
from serve.service import GuardService

log = logging.getLogger("safety_guard.routes")


def error_response(status: int, message: str, err_type: str) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": err_type, "param": None, "code": status}},
                        status_code=status)


class LockChange(BaseModel):
    """POST /guard/lock. adapter: null = the default for every request not overridden; the base model's
    name = requests without an adapter. file: install another lock file (checked against the base)."""

    model_config = ConfigDict(extra="forbid")
    adapter: str | None = None
    enabled: bool | None = None
    strength: float | None = None
    file: str | None = None


class PolicyChange(BaseModel):
    """POST /guard/policy: the vet policy for adapters loaded from now on, what the conditional lock does with a
    flagged request (`refuse` | `steer` | `fallback`), whose states its gate reads for an adapter's request
    (`adapter` | `base`: lock.gate_reads); none is persisted to the config."""

    model_config = ConfigDict(extra="forbid")
    vet_policy: Literal["reject", "lock", "warn"] | None = None
    gate_action: Literal["refuse", "steer", "fallback"] | None = None
    gate_reads: Literal["adapter", "base"] | None = None


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
    from fastapi.responses import JSONResponse

    router = APIRouter()

    def service(request: Request) -> Any:
        if not _authorised(request):
            return error_response(401, "Unauthorized", "Unauthorized")
        svc = getattr(request.app.state, "guard", None)
        if svc is None:
            return error_response(503, "safety-guard is not running on this server (no engine)", "ServiceUnavailable")
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
                return error_response(400, f"{e} (the previous lock stays)", "InvalidUserInput")
            if change.enabled is None and change.strength is None:
                await svc.try_push_lock()
                return JSONResponse(svc.status()["lock"])
        if svc.lock_info is None:
            return error_response(409, "no SafetyLock is installed on this server: " + "; ".join(svc.errors or ["none given"]),
                          "LockNotInstalled")
        if change.adapter is not None and change.adapter != svc.base_name \
                and change.adapter not in svc.models.lora_requests:
            known = ", ".join([svc.base_name, *svc.models.lora_requests]) or "none"
            return error_response(404, f"unknown adapter '{change.adapter}' (served: {known})", "NotFoundError")
        if change.enabled is None and change.strength is None:
            return error_response(400, "give 'enabled' and/or 'strength'", "InvalidUserInput")
        before = copy.deepcopy(svc.table)
        try:
            svc.table.set(change.adapter, change.enabled, change.strength)
        except GuardError as e:
            return error_response(409 if "forced" in str(e) else 400, str(e), "InvalidUserInput")
        t0 = time.perf_counter()
        try:
            worker = await svc.push_lock()
        except GuardError as e:  # the workers kept their previous state; so does the table
            svc.table = before
            svc.metrics.count_error("lock_change")
            return error_response(500, f"lock change refused: {e} (the previous lock state stays)", "LockChangeFailed")
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
        if change.vet_policy is None and change.gate_action is None and change.gate_reads is None:
            return error_response(400, "give 'vet_policy', 'gate_action' and/or 'gate_reads'", "InvalidUserInput")
        out: dict[str, Any] = {}
        if change.gate_action is not None or change.gate_reads is not None:
            lock = svc.cfg.lock
            old_action, old_reads = lock.gate_action, lock.gate_reads
            lock.gate_action = change.gate_action or old_action
            lock.gate_reads = change.gate_reads or old_reads
            try:
                if lock.gate_reads == "adapter" and old_reads == "base":
                    await svc.calibrate_missing()  # each adapter's own threshold (not read while on the base)
                await svc.push_lock()
            except GuardError as e:  # the workers kept their previous state; so does the config
                lock.gate_action, lock.gate_reads = old_action, old_reads
                svc.metrics.count_error("lock_change")
                return error_response(500, f"gate policy change refused: {e}", "LockChangeFailed")
            if change.gate_action is not None:
                out.update(gate_action=change.gate_action, previous_gate_action=old_action)
            if change.gate_reads is not None:
                out.update(gate_reads=change.gate_reads, previous_gate_reads=old_reads)
        if change.vet_policy is not None:
            old = svc.cfg.serve.vet_policy
            svc.cfg.serve.vet_policy = change.vet_policy
            if old != change.vet_policy:
                log.warning("safety-guard: vet policy changed at run time: %s -> %s", old, change.vet_policy)
            out.update(vet_policy=change.vet_policy, previous=old)
        return JSONResponse(out)

    @router.post("/guard/probe")
    async def guard_probe(ask: ProbeAsk, request: Request):
        svc = service(request)
        if not isinstance(svc, GuardService):
            return svc
        if svc.monitor is None:
            return error_response(409, "probes are disabled: " + "; ".join(svc.errors), "ProbesDisabled")
        if ask.adapter is None:
            return JSONResponse(await svc.probe_all())
        lr = svc.models.lora_requests.get(ask.adapter)
        if lr is None and ask.adapter != svc.base_name:
            known = ", ".join([svc.base_name, *svc.models.lora_requests])
            return error_response(404, f"unknown adapter '{ask.adapter}' (loaded: {known})", "NotFoundError")
        try:
            return JSONResponse((await svc.monitor.probe(ask.adapter, lr)).to_dict(answers=True))
        except Exception as e:
            return error_response(500, f"probe of '{ask.adapter}' failed: {type(e).__name__}: {e}", "ProbeFailed")

    if runtime_lora_updating:
        add_adapter_routes(router, error_response)

    return router


class RequestLockMiddleware:
    """`"guard": {"lock": "on"}` in a completion request's body: steer this request with the lock.

    Pure ASGI (the body is rewritten before vLLM's handlers parse it): the field is removed and the request id
    gets `serve.worker.FORCE_MARK`, which the workers read (and the prefix-cache salt, so a steered prompt never
    shares KV blocks with an unsteered one). Only "on" exists: no request can turn the lock off. Bodies without
    the word "guard" are passed through untouched, unparsed.
    """

    PATHS = ("/v1/chat/completions", "/v1/completions")

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http" or scope.get("method") != "POST" or scope.get("path") not in self.PATHS:
            await self.app(scope, receive, send)
            return
        chunks, more = [], True
        while more:
            msg = await receive()
            if msg.get("type") != "http.request":
                await self.app(scope, _replay([msg], receive), send)
                return
            chunks.append(msg.get("body", b""))
            more = bool(msg.get("more_body"))
        body = b"".join(chunks)
        if b'"guard"' in body:
            try:
                body, scope = self._rewrite(body, scope)
            except _Refused as e:
                await _send_error(send, e.status, str(e))
                return
        await self.app(scope, _replay([{"type": "http.request", "body": body, "more_body": False}], receive), send)

    @staticmethod
    def _rewrite(body: bytes, scope: dict) -> tuple[bytes, dict]:
        import json
        import uuid

        from serve.worker import FORCE_MARK

        try:
            data = json.loads(body)
        except ValueError:
            return body, scope  # not JSON: vLLM answers it as it would
        if not isinstance(data, dict) or "guard" not in data:
            return body, scope
        ask = data.pop("guard")
        if ask != {"lock": "on"}:
            raise _Refused(400, "'guard' accepts only {\"lock\": \"on\"}: a request can ask for the lock on itself, "
                                "never turn it off")
        svc = getattr(getattr(scope.get("app"), "state", None), "guard", None)
        if svc is None or svc.table is None or not svc.table.request_lock:
            raise _Refused(400, "this server does not take per-request lock requests (serve.request_lock is off)")
        if svc.lock_info is None:
            raise _Refused(409, "no SafetyLock is installed on this server, so none can be applied to this request")
        data["request_id"] = FORCE_MARK + str(data.get("request_id") or uuid.uuid4().hex)
        headers = []
        for k, v in scope.get("headers", []):
            if k.lower() == b"x-request-id":  # vLLM prefers the header over the body's request_id
                v = FORCE_MARK.encode() + v
            if k.lower() != b"content-length":
                headers.append((k, v))
        new = json.dumps(data).encode()
        headers.append((b"content-length", str(len(new)).encode()))
        svc.metrics.forced.inc()
        return new, {**scope, "headers": headers}


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _replay(messages: list[dict], downstream: Any) -> Any:
    """A receive() that hands out the already-read messages, then the client's own (disconnects included)."""
    queue = list(messages)

    async def receive() -> dict:
        if queue:
            return queue.pop(0)
        return await downstream()

    return receive


async def _send_error(send: Any, status: int, message: str) -> None:
    import json

    body = json.dumps({"error": {"message": message, "type": "InvalidUserInput", "param": "guard",
                                 "code": status}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
