"""Live health check: anchor probes through the serving engine itself.

A probe sends the K anchor prompts (chat-templated token ids, exactly what `guard vet` and the offline
reference use) as ordinary generate requests with the adapter's LoRARequest, ids prefixed so the worker
extension captures each one's h(x) (last prompt token, final norm) and leaves them unsteered by the lock.
The greedy answers (drift.probe_tokens tokens) feed the refusal judge. One probe gives:
- drift: mean relative L2 of the anchor states vs the base model's states *computed in the same engine at
  start-up* (engine bf16 vs HF fp32 noise never enters the number; the offline cache is only compared once
  and its max deviation reported),
- the anchor refusal ratio (guard/judge.py DEFAULT_JUDGE), and its drop from the base's own ratio on the same
  anchors, also measured in-engine at start-up.
The anchors are the *probe* anchors (`anchors.set`), never SBR's training anchors; the verdict is
guard/drift.py: verdict, the same rule `guard vet` applies.

**Rotation.** Load-time vetting and `POST /guard/probe` read every probe anchor. The periodic probe reads the
next `serve.probe_batch` anchors of each adapter (rotating through the set), so its engine time stays small
whatever the size of the probe pool; the gauge always reports over the latest reading of *every* anchor (per
adapter, a reading per anchor is kept and refreshed), so a probe of 8 anchors never makes the verdict rest on
8 prompts.

Probes are serialised (one at a time), send at most `serve.probe_concurrency` requests at once, and are bounded
by a stall timeout: a probe fails when none of its requests finishes for `timeout` seconds, not when the whole
set takes longer than that, so a large calibration set on a slow CPU (hundreds of prefills at ~15 tokens/s in
bf16 without native bf16) completes while a hung engine is still caught. The window is what makes the stall
timeout mean progress: sent all at once, a probe's requests share every step and finish together, so a slow
engine looked hung (57 anchors under LoRA on a 2-core AMD EPYC finished none in 120 s), and user requests
waited behind the whole burst. A failing probe is counted and logged and never touches user requests (they are
separate requests; the probe's are aborted on timeout).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from guard.drift import DriftReport, Verdict, anchor_drift, verdict
from guard.errors import GuardError
from guard.judge import DEFAULT_JUDGE, RefusalJudge

log = logging.getLogger("safety_guard.monitor")
PROBE_PREFIX = "guardprobe"


@dataclass
class ProbeResult:
    adapter: str
    drift: DriftReport
    answers: list[str]
    refusals: list[bool]
    verdict: Verdict
    seconds: float
    when: float
    base_refusal_ratio: float | None = None
    probed: int = 0  # anchors read by this probe
    coverage: float = 1.0  # share of the probe anchors with a reading (1 after the load-time probe)

    @property
    def refusal_ratio(self) -> float:
        return sum(self.refusals) / len(self.refusals)

    @property
    def refusal_drop(self) -> float | None:
        return None if self.base_refusal_ratio is None else self.base_refusal_ratio - self.refusal_ratio

    def to_dict(self, answers: bool = False) -> dict[str, Any]:
        out = {"adapter": self.adapter, "drift": round(self.drift.mean_rel_l2, 5),
               "max_drift": round(self.drift.max_rel_l2, 5), "mean_cosine": round(self.drift.mean_cosine, 6),
               "refusal_ratio": self.refusal_ratio, "base_refusal_ratio": self.base_refusal_ratio,
               "status": self.verdict.status,
               "reasons": list(self.verdict.reasons), "seconds": round(self.seconds, 3), "time": self.when,
               "probed": self.probed, "coverage": round(self.coverage, 4)}
        if answers:
            out["answers"] = self.answers
        return out


@dataclass
class AnchorReadings:
    """The latest reading of every probe anchor for one adapter (None until first read)."""

    rel: list[float | None]
    cos: list[float | None]
    refused: list[bool | None]
    answers: list[str | None]
    cursor: int = 0  # where the next rotating probe starts

    @classmethod
    def empty(cls, k: int) -> AnchorReadings:
        return cls([None] * k, [None] * k, [None] * k, [None] * k)

    def update(self, indices: list[int], drift: DriftReport, refused: list[bool], answers: list[str]) -> None:
        for j, i in enumerate(indices):
            self.rel[i], self.cos[i], self.refused[i], self.answers[i] = drift.rel_l2[j], drift.cosine[j], refused[j], answers[j]

    def seen(self) -> list[int]:
        return [i for i, r in enumerate(self.rel) if r is not None]

    def next_batch(self, n: int) -> list[int]:
        k = len(self.rel)
        out = [(self.cursor + j) % k for j in range(min(n, k))]
        self.cursor = (self.cursor + len(out)) % k
        return out


def next_probe_delay(interval: float, spent: float, max_share: float | None) -> float:
    """Seconds to wait before the next periodic round, given the configured interval and the last round's wall
    time: at least the interval, and long enough that probing stays within `max_share` of the time
    (`serve.probe_max_share`: spent / (spent + wait) <= max_share)."""
    if not max_share or spent <= 0:
        return interval
    return max(interval, spent / max_share - spent)


def request_index(engine_request_id: str, prefix: str) -> int | None:
    """Anchor index of an engine request id `<prefix>-<i>-<8 hex>` (vLLM appends the random suffix)."""
    if not engine_request_id.startswith(prefix + "-"):
        return None
    head = engine_request_id[len(prefix) + 1:].split("-", 1)[0]
    return int(head) if head.isdigit() else None


class Monitor:
    """Probes adapters through `engine_client`; keeps the in-engine reference and the latest results."""

    def __init__(self, engine_client: Any, workers: Any, anchor_ids: list[list[int]], drift_cfg: Any, metrics: Any,
                 judge: RefusalJudge = DEFAULT_JUDGE, timeout: float = 120.0, concurrency: int = 16) -> None:
        """`timeout`: seconds a probe may go without any of its requests finishing; `concurrency`: its requests in
        flight at once (see the module docstring)."""
        self.engine = engine_client
        self.workers = workers  # serve.rpc.WorkerClient
        self.anchor_ids = anchor_ids
        self.drift_cfg = drift_cfg
        self.metrics = metrics
        self.judge = judge
        self.timeout = timeout
        self.concurrency = max(1, concurrency)
        self.reference: Any = None  # torch [K, hidden] float32, in-engine base states
        self.base_refusal_ratio: float | None = None  # the base's own share of probe anchors refused, in-engine
        self.reference_check: dict[str, Any] = {}
        self.latest: dict[str, ProbeResult] = {}
        self.readings: dict[str, AnchorReadings] = {}
        self.base_refusals: list[bool] | None = None  # the base's own refusal of each probe anchor, in-engine
        self.failures: dict[str, str] = {}
        self._lock = asyncio.Lock()

    async def _capture(self, lora_request: Any, prompts: list[list[int]], max_tokens: int,
                       keys: list[int] | None = None) -> tuple[dict[int, list[float]], dict[int, float], list[str]]:
        """Run `prompts` (token ids) greedily under `lora_request` as probe requests, unsteered; returns their
        lm_head-input states and prompt-gate scores at the last prompt token, by position, and the answers.
        Request ids are `<prefix>-<key>` (`keys`: e.g. anchor indices; default the positions)."""
        keys = list(range(len(prompts))) if keys is None else keys
        pos = {k: j for j, k in enumerate(keys)}
        prefix = f"{PROBE_PREFIX}-{uuid.uuid4().hex[:12]}"
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        answers = [""] * len(prompts)
        window = asyncio.Semaphore(self.concurrency)

        async def one(i: int, ids: list[int]) -> None:
            final = None
            async with window:
                async for out in self.engine.generate({"prompt_token_ids": ids}, params, f"{prefix}-{keys[i]}",
                                                      lora_request=lora_request):
                    final = out
            answers[i] = final.outputs[0].text if final is not None and final.outputs else ""

        await self.workers.probe_arm(prefix)
        tasks = [asyncio.create_task(one(j, ids)) for j, ids in enumerate(prompts)]
        try:
            pending: set[asyncio.Task[None]] = set(tasks)
            while pending:  # the stall timeout of the module docstring
                done, pending = await asyncio.wait(pending, timeout=self.timeout, return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    raise TimeoutError(f"no probe request finished in {self.timeout:g} s ({len(pending)} of "
                                       f"{len(tasks)} unfinished)")
                for t in done:
                    t.result()  # a request's own error fails the probe now
        except BaseException:
            for t in tasks:
                t.cancel()  # cancelling the generator aborts the engine request
            # collect them, so no "exception was never retrieved" traceback is logged for the gather
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            captured = await self.workers.probe_collect_all(prefix)
        by_index = lambda d: {pos[k]: v for rid, v in d.items() if (k := request_index(rid, prefix)) in pos}  # noqa: E731
        return by_index(captured["states"]), by_index(captured["gate_scores"]), answers

    async def _states_and_answers(self, lora_request: Any, max_tokens: int,
                                  indices: list[int] | None = None) -> tuple[Any, list[str]]:
        """States and greedy answers of the anchors `indices` (default all), in that order."""
        import torch

        indices = list(range(len(self.anchor_ids))) if indices is None else indices
        rows, _, answers = await self._capture(lora_request, [self.anchor_ids[i] for i in indices], max_tokens,
                                               keys=indices)
        missing = [indices[j] for j in range(len(indices)) if j not in rows]
        if missing:
            raise GuardError(f"probe captured no hidden state for anchors {missing}")
        return torch.tensor([rows[j] for j in range(len(indices))], dtype=torch.float32), answers

    async def gate_scores(self, lora_request: Any, prompts: list[list[int]]) -> Any:
        """[len(prompts)] float32: the prompt gate's score of each prompt under `lora_request`, read inside the
        engine from one prefill each (what `PromptGate.calibrated` sets the adapter's threshold from)."""
        import torch

        _, scores, _ = await self._capture(lora_request, prompts, 1)
        missing = [j for j in range(len(prompts)) if j not in scores]
        if missing:
            raise GuardError(f"the prompt gate gave no score for {len(missing)} of {len(prompts)} calibration prompts "
                             f"(is a lock with a gate installed?)")
        return torch.tensor([scores[j] for j in range(len(prompts))], dtype=torch.float32)

    async def compute_reference(self, offline: Any | None = None) -> dict[str, Any]:
        """Base-model anchor states in this engine; compared once with the offline cache when given."""
        async with self._lock:
            t0 = time.perf_counter()
            states, answers = await self._states_and_answers(None, self.drift_cfg.probe_tokens)
        self.reference = states
        refusals = [self.judge.is_refusal(a) for a in answers]
        self.base_refusals = refusals
        self.base_refusal_ratio = sum(refusals) / len(refusals)
        check: dict[str, Any] = {"anchors": len(self.anchor_ids), "seconds": round(time.perf_counter() - t0, 3),
                                 "base_refusal_ratio": sum(refusals) / len(refusals)}
        if offline is not None:
            d = anchor_drift(states, offline)
            check.update(offline_max_deviation=round(d.max_rel_l2, 6), offline_mean_deviation=round(d.mean_rel_l2, 6),
                         offline_min_cosine=round(min(d.cosine), 6))
            self.metrics.set_reference_deviation(d.max_rel_l2)
        else:
            check["offline_max_deviation"] = None
            self.metrics.set_reference_deviation(-1.0)
        self.reference_check = check
        return check

    async def probe(self, name: str, lora_request: Any, batch: int | None = None) -> ProbeResult:
        """Probe one adapter on every anchor (batch None) or on the next `batch` anchors of its rotation; the
        result and the gauges report over the latest reading of every anchor. Raises (after counting the
        failure) when it fails."""
        if self.reference is None:
            raise GuardError("no in-engine reference yet (the guard is still starting)")
        k = len(self.anchor_ids)
        readings = self.readings.setdefault(name, AnchorReadings.empty(k))
        indices = list(range(k)) if batch is None or batch >= k else readings.next_batch(batch)
        async with self._lock:
            t0 = time.perf_counter()
            try:
                states, answers = await self._states_and_answers(lora_request, self.drift_cfg.probe_tokens, indices)
                drift = anchor_drift(states, self.reference[indices])
            except Exception as e:  # counted, logged, re-raised to the caller (who never fails a user request)
                self.metrics.count_probe_failure(name)
                msg = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                self.failures[name] = msg
                log.warning("safety-guard probe of '%s' failed: %s", name, msg)
                raise
            seconds = time.perf_counter() - t0
        readings.update(indices, drift, [self.judge.is_refusal(a) for a in answers], answers)
        seen = readings.seen()
        total = DriftReport(tuple(readings.rel[i] for i in seen), tuple(readings.cos[i] for i in seen))
        refusals = [bool(readings.refused[i]) for i in seen]
        ratio = sum(refusals) / len(refusals)
        base = (None if self.base_refusals is None
                else sum(self.base_refusals[i] for i in seen) / len(seen))  # the base on the same anchors
        result = ProbeResult(name, total, [readings.answers[i] or "" for i in seen], refusals,
                             verdict(total.mean_rel_l2, ratio, self.drift_cfg, base), seconds, time.time(), base,
                             probed=len(indices), coverage=len(seen) / k)
        self.metrics.observe_probe(name, total.mean_rel_l2, ratio, seconds, result.when, result.refusal_drop,
                                   result.verdict.status)
        self.latest[name] = result
        self.failures.pop(name, None)
        log.info("safety-guard probe '%s' (%d of %d anchors): drift %.4f refusal ratio %.2f -> %s (%.2f s)", name,
                 len(indices), k, total.mean_rel_l2, ratio, result.verdict.status, seconds)
        return result

    def forget(self, name: str) -> None:
        self.latest.pop(name, None)
        self.readings.pop(name, None)
        self.failures.pop(name, None)
        self.metrics.forget_adapter(name)
