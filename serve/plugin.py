"""vLLM plug-in entry points: how safety-guard hooks into stock vLLM (no fork).

Two entry points (pyproject.toml):
- `vllm.general_plugins` -> `register()`: runs in every vLLM process (API server, EngineCore, workers),
  possibly more than once, before the model is built, and applies `serve.patches` (the worker extension and
  compile-cache key on the engine config, the lock buffers at model load, the per-step strength writes, the
  CPU LoRA fix). Idempotent and cheap; does nothing unless the guard is enabled ($SAFETY_GUARD_CONFIG is set,
  possibly to an empty string for the defaults).
- `vllm.endpoint_plugins` -> `GuardEndpointPlugin`: API server only, and only when named in VLLM_PLUGINS
  (which then filters every plugin group: name both, `VLLM_PLUGINS=safety_guard,safety_guard_api`).
  `attach_router` adds the /guard/ routes and the vetting gate on /v1/load_lora_adapter; `init_state`
  loads the guard config, builds the metrics on vLLM's registry and starts `GuardService`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger("safety_guard.plugin")

GENERAL_PLUGIN = "safety_guard"
ENDPOINT_PLUGIN = "safety_guard_api"


def guard_enabled() -> bool:
    return "SAFETY_GUARD_CONFIG" in os.environ


def register() -> None:
    """General plugin: idempotent, re-entrant (vLLM may call it several times per process)."""
    if not guard_enabled():
        return
    from serve.patches import apply_all

    apply_all()


class GuardEndpointPlugin:
    """`vllm.endpoint_plugins` factory: the guard's HTTP surface and its start-up."""

    name = ENDPOINT_PLUGIN
    required_tasks = ("generate",)

    def attach_router(self, app: Any) -> None:
        from vllm import envs

        from serve.routes import RequestLockMiddleware, build_router

        app.include_router(build_router(bool(envs.VLLM_ALLOW_RUNTIME_LORA_UPDATING)))
        app.add_middleware(RequestLockMiddleware)

    async def init_state(self, engine_client: Any, state: Any, args: Any) -> None:
        from guard.config import load_config
        from guard.errors import GuardError
        from serve.service import GuardService
        from serve.metrics import GuardMetrics

        if engine_client is None:  # the CPU-only render server has no engine
            return
        _setup_logging()
        try:
            cfg = load_config()
        except GuardError as e:
            # A malformed config must not take the server down: serve unguarded and say so everywhere.
            log.error("safety-guard: %s; the guard is OFF", e)
            from guard.config import GuardConfig

            cfg = GuardConfig()
            cfg.serve.lock_policy = "off"
            cfg.serve.probe_interval_seconds = 0
            bad_config = str(e)
        else:
            bad_config = None
        from vllm.v1.metrics.prometheus import get_prometheus_registry

        metrics = _metrics_once(GuardMetrics, get_prometheus_registry())
        svc = GuardService(cfg, metrics, engine_client, args, state.openai_serving_models)
        state.guard = svc
        if bad_config is not None:
            svc.errors.append(f"config: {bad_config}; the guard is off")
            svc.table = _off_table(svc.base_name)
            return
        await svc.start()


def _off_table(base_name: str) -> Any:
    from serve.lock_table import LockTable

    return LockTable(base_name=base_name)


_METRICS: dict[int, Any] = {}


def _metrics_once(factory: Any, registry: Any) -> Any:
    """One GuardMetrics per registry per process (a second build would clash on metric names)."""
    key = id(registry)
    if key not in _METRICS:
        _METRICS[key] = factory(registry)
    return _METRICS[key]


def _setup_logging() -> None:
    logger = logging.getLogger("safety_guard")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [%(name)s] %(message)s", "%m-%d %H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
