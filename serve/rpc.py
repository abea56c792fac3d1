"""`WorkerClient`: the API server's typed view of the guard's worker RPCs. The only place their names appear.

Every call goes through vLLM's `engine_client.collective_rpc`, which reaches every worker (all tensor-parallel
ranks) between engine steps. Workers answer `{"ok": bool, ...}` and never raise (serve/worker.py); a transport
failure (engine dead, RPC timeout) becomes `{"ok": False, "error": ...}` here too, so callers handle one shape.
Results from several workers are checked together: a change counts only if every worker took it.
"""

from __future__ import annotations

from typing import Any

from guard.errors import GuardError


class WorkerClient:
    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.failures = 0  # calls that did not come back ok (RPC errors and refusals), for the metrics

    async def _call(self, method: str, *args: Any) -> list[dict[str, Any]]:
        try:
            results = await self.engine.collective_rpc(method, args=args)
        except Exception as e:
            self.failures += 1
            return [{"ok": False, "error": f"{method} failed: {type(e).__name__}: {e}"}]
        results = [r if isinstance(r, dict) else {"ok": False, "error": f"{method}: unexpected reply {r!r}"}
                   for r in results]
        if any(not r.get("ok") for r in results):
            self.failures += 1
        return results

    @staticmethod
    def first_error(results: list[dict[str, Any]]) -> str | None:
        return next((str(r.get("error")) for r in results if not r.get("ok")), None)

    async def ping(self) -> list[dict[str, Any]]:
        results = await self._call("guard_ping")
        err = self.first_error(results)
        if err is not None:
            raise GuardError(err)
        return results

    async def install_lock(self, path: str, base_fingerprint: str | None) -> dict[str, Any]:
        results = await self._call("guard_install_lock", path, base_fingerprint)
        err = self.first_error(results)
        return {"ok": False, "error": err} if err else results[0]

    async def set_lock(self, default: float, overrides: dict[int, float], gated: bool = False,
                       ungated: list[int] | None = None, force_strength: float = 0.0,
                       refusal: list[list[float]] | None = None,
                       thresholds: dict[int, float] | None = None, fallback: bool = False) -> dict[str, Any]:
        results = await self._call("guard_set_lock", default, overrides, gated, list(ungated or ()), force_strength,
                                   refusal, dict(thresholds or {}), fallback)
        err = self.first_error(results)
        return {"ok": False, "error": err} if err else results[0]

    async def lock_state(self) -> list[dict[str, Any]]:
        return await self._call("guard_lock_state")

    async def probe_arm(self, prefix: str) -> None:
        err = self.first_error(await self._call("guard_probe_arm", prefix))
        if err is not None:
            raise GuardError(f"probe could not start: {err}")

    async def probe_collect_all(self, prefix: str) -> dict[str, dict[str, Any]]:
        """{"states": {request id: h(x)}, "gate_scores": {request id: the prompt gate's score}}."""
        results = await self._call("guard_probe_collect", prefix)
        err = self.first_error(results)
        if err is not None:
            raise GuardError(f"probe collection failed: {err}")
        return {"states": results[0].get("states", {}), "gate_scores": results[0].get("gate_scores", {})}
