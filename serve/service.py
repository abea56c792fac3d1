"""The guard's state in the API server: start-up, the lock (install, push, prefix-cache salt), probes, status.

`GuardService` is created by the endpoint plugin's `init_state` (once per API server) and lives on
`app.state.guard`. It owns the lock table (serve/lock_table.py), the vetting gate (serve/gate.py), the monitor
(serve/monitor.py) and the metrics (serve/metrics.py), and reaches the workers only through
serve.rpc.WorkerClient. The HTTP routes are in serve/routes.py.

Prefix cache vs lock changes (KV blocks computed under the old lock state would otherwise be reused): every
request gets a cache salt naming the current *lock epoch* (bumped on every lock change), so a request never
shares KV blocks with one admitted under another lock state. No reset, no preemption: in-flight requests
carry on (the change lands on their next step), and old blocks age out of the cache. Resetting the cache
instead would have to preempt every running request on each change (a soft reset fails while any request
holds blocks), and under load on CPU that livelocked the server: each change threw away every prefill.
Fallback when the salt hook cannot be installed (another vLLM): the preempting reset.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from guard.errors import GuardError
from serve.gate import VettingGate
from serve.patches import EXTENSION, install_cache_salt
from serve.rpc import WorkerClient

log = logging.getLogger("safety_guard.service")


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
        self.probe_delay = float(cfg.serve.probe_interval_seconds)  # the periodic probe's next wait (probe_max_share)
        self._refusal_cache: list[list[float]] | None = None
        self._seen_gate: dict[int, tuple[int, ...]] = {}  # lora id -> (scored, flagged, judged, answered) counted
        self.lock_info: dict[str, Any] | None = None
        self.table: Any = None
        self.monitor: Any = None
        self.gate = VettingGate(self)
        self.started = False
        self.last_cache_reset: dict[str, Any] = {}
        self._loop_task: asyncio.Task | None = None
        self._push_lock = asyncio.Lock()
        self.lock_epoch = 0
        self.salting = False
        self.gate_steers = False  # the workers steer flagged requests (gate_action steer, or refuse unavailable)
        self.prompt_gate: Any = None  # guard.lock.PromptGate of the installed lock (None: no gate, or no lock)
        self._calibration_ids: list[list[int]] | None = None  # its dev slice, tokenized for this model

    # -- start-up ------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Everything the guard needs before serving; each failure is recorded and the server keeps serving."""
        from guard.anchors import from_config as anchors_from_config
        from guard.models import check_model_dir, fingerprint_dir
        from serve.monitor import Monitor
        from serve.lock_table import LockTable

        # flagged requests under the conditional policy use the strength chosen for that mode
        strength = self.cfg.lock.gate_strength if self.cfg.serve.lock_policy == "conditional" else self.cfg.lock.strength
        self.table = LockTable.from_config(self.cfg.serve, self.base_name, strength)
        self.salting = install_cache_salt(self.engine, lambda: self.lock_epoch, self.steered_by_gate, self.base_read_mark)
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
        self.monitor = Monitor(self.engine, self.workers, anchor_ids, self.cfg.drift, self.metrics,
                               concurrency=self.cfg.serve.probe_concurrency)
        offline = self._offline_reference(anchors, anchor_ids)
        try:
            check = await self.monitor.compute_reference(offline)
            log.info("safety-guard in-engine reference: %s", check)
        except Exception as e:
            self._fail(f"in-engine reference failed, probes disabled: {type(e).__name__}: {e}")
            self.monitor = None
            return
        await self.calibrate_gate([self.base_name])  # adapters given at start-up are calibrated as they are vetted
        for name in list(self.models.lora_requests):  # adapters given at start-up
            try:
                await self.gate.vet(name)
            except Exception as e:
                log.exception("safety-guard: vetting start-up adapter '%s' failed", name)
                self.errors.append(f"vetting '{name}' failed: {e}")
        if self.table.thresholds:
            await self.try_push_lock()  # the calibrated gate thresholds of the base and the start-up adapters
        self.started = True
        if self.cfg.serve.probe_interval_seconds > 0:
            self._loop_task = asyncio.create_task(self._probe_loop())

    def _fail(self, msg: str) -> None:
        log.error("safety-guard: %s", msg)
        if msg not in self.errors:  # a condition met on every lock push is listed once
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
        await self._read_gate(path)
        if self.monitor is not None:  # a lock installed at run time: every adapter's threshold is calibrated anew
            await self.calibrate_gate()
        return self.lock_info

    async def _read_gate(self, path: str) -> None:
        """The installed lock's prompt gate, for calibrating its threshold per adapter (the workers hold the
        weights; the service needs the threshold, the base's dev statistics and the dev slice)."""
        from guard.lock import load_lock

        if self.table is not None:
            self.table.thresholds.clear()  # calibrated for the previous gate
        self.prompt_gate, self._calibration_ids = None, None
        try:
            self.prompt_gate = (await asyncio.to_thread(load_lock, path)).gate
        except Exception as e:  # the workers accepted the file: this cannot fail for a good reason
            self._fail(f"reading the prompt gate of {path} failed ({type(e).__name__}: {e}); not calibrated")

    async def calibrate_gate(self, names: list[str] | None = None) -> None:
        """Set the prompt gate's threshold for each of `names` (default: the base and every loaded adapter) from
        that model's own gate scores on the gate's dev slice, read in the engine (`lock.gate_calibration`; see
        guard.lock.PromptGate.calibrated). A failed calibration fails closed: that adapter's requests are steered
        unconditionally, with one error line, counted. The caller pushes the table."""
        how = self.cfg.lock.gate_calibration
        gate = self.prompt_gate
        if how == "none" or gate is None or self.table is None or not self.table.conditional:
            return  # thresholds only matter for gated requests, and only the conditional policy gates
        names = [self.base_name, *self.models.lora_requests] if names is None else names
        if self.cfg.lock.gate_reads == "base":  # every request is scored on the base's states: one threshold
            names = [n for n in names if n == self.base_name]
        for name in names:
            try:
                if self.monitor is None:
                    raise GuardError("probes are disabled (see errors)")
                if self._calibration_ids is None:
                    prompts = gate.meta.get("dev_prompts")
                    if not prompts:
                        raise GuardError("the lock's gate carries no dev prompts (built before calibration): rebuild "
                                         "it with `guard lock build --rebuild`")
                    from guard.anchors import render_chat

                    tok = await asyncio.to_thread(_load_tokenizer, self.model_dir)
                    self._calibration_ids = [render_chat(tok, [{"role": "user", "content": p}]) for p in prompts]
                lr = None if name == self.base_name else self._lora_request(name)
                scores = await self.monitor.gate_scores(lr, self._calibration_ids)
                self.table.thresholds[name] = gate.calibrated(scores, how).threshold
            except Exception as e:
                self.table.thresholds[name] = None
                self._fail(f"prompt-gate calibration of '{name}' failed ({type(e).__name__}: {e}); its requests are "
                           f"steered unconditionally")
                self.metrics.count_error("gate_calibration")

    async def calibrate_missing(self) -> None:
        """Calibrate the base and every loaded adapter that has no threshold yet (`gate_reads` switched to
        `adapter`: the ones read before stay valid, so flipping back and forth does not recalibrate each time)."""
        if self.table is not None:
            if names := self.table.uncalibrated([self.base_name, *self.models.lora_requests]):
                await self.calibrate_gate(names)

    def _lora_request(self, name: str) -> Any:
        """An adapter's LoRARequest, also while vetting hides it from the served table."""
        lr = self.models.lora_requests.get(name) or self.gate.hidden.get(name)
        if lr is None:
            raise GuardError(f"adapter '{name}' is not loaded")
        return lr

    # -- lock ----------------------------------------------------------------------------------------
    def steered_by_gate(self, request: Any) -> bool:
        """Would the workers steer this request's prompt if the gate flagged it? Then it gets a prefix-cache salt
        of its own (serve.patches.install_cache_salt). Only under a gate that steers; refuse and fallback do not."""
        if not self.gate_steers:
            return False
        lr = getattr(request, "lora_request", None)
        return self.table.gated(lr.lora_name if lr is not None else self.base_name)

    def base_read_mark(self, request: Any) -> str | None:
        """lock.gate_reads base: the suffix that sends a gated adapter request through a scoring prefill on the base
        (serve/patches.py, section 6), None for every other request (the base's own, probes, forced ones)."""
        from serve.monitor import PROBE_PREFIX
        from serve.worker import BASE_READ_MARK, FORCE_MARK

        lr = getattr(request, "lora_request", None)
        if (lr is None or self.cfg.lock.gate_reads != "base" or self.prompt_gate is None or self.lock_info is None
                or self.table is None):
            return None
        rid = str(getattr(request, "request_id", ""))
        if rid.startswith(PROBE_PREFIX) or FORCE_MARK in rid or not self.table.gated(lr.lora_name):
            return None
        return f"{BASE_READ_MARK}{int(lr.lora_int_id)}"

    def lora_ids(self) -> dict[str, int]:
        return {name: lr.lora_int_id for name, lr in self.models.lora_requests.items()}

    async def push_lock(self) -> dict[str, Any]:
        """Send the lock table to every worker, update the gauges, reset the prefix cache."""
        async with self._push_lock:
            args = self.table.worker_args(self.lora_ids())
            if self.lock_info is None:
                args = {"default": 0.0, "overrides": {}}
            elif args.get("gated") and self.cfg.lock.gate_action in ("refuse", "fallback"):
                try:  # fallback keeps the refusal rows too: they answer a flagged request the scheduler did not restart
                    args["refusal"] = await self._refusal_rows()
                    args["fallback"] = self.cfg.lock.gate_action == "fallback"
                except Exception as e:  # fall back to steering flagged requests; said once, counted
                    self._fail(f"gate_action refuse unavailable ({type(e).__name__}: {e}); steering flagged requests")
                    self.metrics.count_error("lock_change")
            t0 = time.perf_counter()
            result = await self.workers.set_lock(**args)
            if not result.get("ok") and args.get("gated") and "conditional lock unavailable" in str(result.get("error")):
                # fail closed: no usable gate, so what the policy would have gated is steered unconditionally
                self._fail(f"{result.get('error')}; steering those requests unconditionally instead")
                self.metrics.count_error("lock_change")
                result = await self.workers.set_lock(**{**args, "gated": False, "ungated": []})
            rpc_ms = (time.perf_counter() - t0) * 1e3
            if not result.get("ok"):
                raise GuardError(f"workers refused the lock change: {result.get('error')}")
            self.gate_steers = bool(result.get("gate", {}).get("gating")) and result.get("action") == "steer"
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

    async def _refusal_rows(self) -> list[list[float]]:
        """The rows that force `lock.refusal` on a flagged request (computed once from the served checkpoint)."""
        if self._refusal_cache is None:
            from guard.lock import forcing_states, refusal_ids
            from guard.models import output_head_weight

            def build() -> list[list[float]]:
                ids = refusal_ids(_load_tokenizer(self.model_dir), self.cfg.lock.refusal)
                return forcing_states(output_head_weight(self.model_dir), ids).tolist()

            self._refusal_cache = await asyncio.to_thread(build)
        return self._refusal_cache

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

    # -- probe loop ----------------------------------------------------------------------------------
    async def probe_all(self, batch: int | None = None) -> dict[str, Any]:
        """Probe every loaded adapter: every anchor (batch None), or the next `batch` of each one's rotation."""
        out: dict[str, Any] = {}
        for name, lr in list(self.models.lora_requests.items()):
            try:
                out[name] = (await self.monitor.probe(name, lr, batch)).to_dict()
            except Exception as e:
                out[name] = {"adapter": name, "status": "probe_failed", "error": f"{type(e).__name__}: {e}"}
        return out

    async def _probe_loop(self) -> None:
        from serve.monitor import next_probe_delay

        serve_cfg = self.cfg.serve
        while True:
            await asyncio.sleep(self.probe_delay)
            t0 = time.perf_counter()
            try:
                await self.probe_all(serve_cfg.probe_batch)
                await self.refresh_worker_state()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the loop die
                log.exception("safety-guard probe loop")
            spent = time.perf_counter() - t0
            delay = next_probe_delay(serve_cfg.probe_interval_seconds, spent, serve_cfg.probe_max_share)
            if delay > serve_cfg.probe_interval_seconds and delay > 1.5 * self.probe_delay:
                log.warning("safety-guard: a probe round took %.1f s; the next waits %.0f s (serve.probe_max_share "
                            "%.3g)", spent, delay, serve_cfg.probe_max_share)
            self.probe_delay = delay

    # -- status --------------------------------------------------------------------------------------
    async def refresh_worker_state(self) -> None:
        """Fetch each worker's lock state; per-step errors the workers met since the last look are counted."""
        states = await self.workers.lock_state()
        self.worker_state = states
        step_errors = sum(int(s.get("step_errors", 0)) for s in states if s.get("ok"))
        if step_errors > self._seen_step_errors:
            self.metrics.count_error("worker_step", step_errors - self._seen_step_errors)
            self._seen_step_errors = step_errors
        first = next((s for s in states if s.get("ok")), None)  # every rank gates the same requests
        if first is not None:
            names = {0: self.base_name, **{lid: name for name, lid in self.lora_ids().items()}}
            gate = first.get("gate") or {}
            keys = ("scored", "flagged", "judged", "answered")
            for lid_s in (gate.get("scored") or {}):
                lid = int(lid_s)
                now = tuple(int((gate.get(k) or {}).get(lid_s, 0)) for k in keys)
                seen = self._seen_gate.get(lid, (0, 0, 0, 0))
                if all(a >= b for a, b in zip(now, seen)):  # a restarted worker starts from 0: skip that round
                    self.metrics.count_gate(names.get(lid, f"lora-{lid}"), *(a - b for a, b in zip(now, seen)))
                self._seen_gate[lid] = now

    def status(self) -> dict[str, Any]:
        mon = self.monitor
        adapters = {}
        for name in self.models.lora_requests:
            rec = self.gate.records.get(name)
            latest = mon.latest.get(name) if mon else None
            adapters[name] = {
                "vetting": {"status": rec.status, "reasons": rec.reasons, "action": rec.action} if rec else None,
                "lock_strength": self.table.strength_of(name) if self.lock_info else 0.0,
                "lock_forced": name in self.table.forced,
                # the prompt gate's threshold calibrated on this adapter (null: calibration failed, steered
                # unconditionally; absent: not calibrated, the gate's own threshold)
                **({"gate_threshold": self.table.thresholds[name]} if name in self.table.thresholds else {}),
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
                     "gate_calibration": self.cfg.lock.gate_calibration, "gate_reads": self.cfg.lock.gate_reads,
                     "gate_threshold": self.prompt_gate.threshold if self.prompt_gate is not None else None,
                     "base_gate_threshold": self.table.thresholds.get(self.base_name) if self.table else None,
                     "last_prefix_cache_reset": self.last_cache_reset},
            "vet_policy": self.cfg.serve.vet_policy,
            "thresholds": {"drift_warn": self.cfg.drift.warn, "drift_fail": self.cfg.drift.fail,
                           "refusal_drop_warn": self.cfg.drift.refusal_drop_warn,
                           "refusal_drop_fail": self.cfg.drift.refusal_drop_fail,
                           "min_refusal_ratio": self.cfg.drift.min_refusal_ratio},
            "probe_interval_seconds": self.cfg.serve.probe_interval_seconds,
            "probe_next_wait_seconds": round(self.probe_delay, 1),  # stretched by serve.probe_max_share
            "reference": mon.reference_check if mon else None,
            "adapters": adapters,
        }


def _load_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
