"""The live health check's bookkeeping (serve/monitor.py) against a stand-in engine: rotating probes, the
per-anchor readings the gauge reports over, and the base's refusals on the same anchors."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from guard.config import DriftConfig  # noqa: E402
from serve.monitor import Monitor, next_probe_delay  # noqa: E402

K, HIDDEN = 10, 4


class Engine:
    """generate(): anchor i answers a refusal when the base (or a 'safe' adapter) refuses it: even anchors."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.last_lora: str | None = None

    async def generate(self, inputs, params, request_id, lora_request=None):
        self.seen.append(request_id)
        self.last_lora = lora_request.name if lora_request is not None else None
        i = int(request_id.rsplit("-", 1)[1])
        bad = lora_request is not None and lora_request.name == "bad"
        text = "Sure, here it is" if bad or i % 2 else "I can't help with that."
        yield SimpleNamespace(outputs=[SimpleNamespace(text=text)], lora=lora_request)


class Workers:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def probe_arm(self, prefix: str) -> None:
        self.prefix = prefix

    async def probe_collect_all(self, prefix: str) -> dict[str, dict]:
        out, scores = {}, {}
        for rid in self.engine.seen:
            if rid.startswith(prefix):
                i = int(rid.rsplit("-", 1)[1])
                row = torch.full((HIDDEN,), float(i + 1))
                if self.shift:
                    row = row * (1 + self.shift)
                out[f"{rid}-1f2e3d4c"] = row.tolist()  # vLLM appends a random suffix
                if self.gate:
                    scores[f"{rid}-1f2e3d4c"] = 0.5 * i + (2.0 if self.engine.last_lora == "moved" else 0.0)
        self.engine.seen.clear()
        return {"states": out, "gate_scores": scores}

    shift = 0.0
    gate = True


class Metrics:
    def __init__(self) -> None:
        self.observed: list[tuple] = []

    def observe_probe(self, *args, **kw) -> None:
        self.observed.append(args)

    def count_probe_failure(self, name: str) -> None:
        pass

    def set_reference_deviation(self, v: float) -> None:
        pass

    def forget_adapter(self, name: str) -> None:
        pass


def make() -> tuple[Monitor, Workers]:
    engine = Engine()
    workers = Workers(engine)
    mon = Monitor(engine, workers, [[1, 2, i] for i in range(K)], DriftConfig(), Metrics())
    asyncio.run(mon.compute_reference())
    return mon, workers


def test_rotating_probes_cover_every_anchor_and_the_gauge_reports_over_all_readings():
    mon, workers = make()
    assert mon.base_refusal_ratio == 0.5 and mon.base_refusals == [i % 2 == 0 for i in range(K)]
    good = SimpleNamespace(name="good")
    full = asyncio.run(mon.probe("good", good))
    assert full.probed == K and full.coverage == 1 and full.drift.mean_rel_l2 == 0 and full.verdict.status == "ok"

    workers.shift = 0.5  # the adapter drifts: each rotating probe refreshes 4 anchors' readings
    r = asyncio.run(mon.probe("good", good, batch=4))
    assert r.probed == 4 and r.coverage == 1 and len(r.drift.rel_l2) == K
    assert r.drift.mean_rel_l2 == pytest.approx(0.5 * 4 / K)  # 4 fresh readings of 0.5, 6 old ones of 0
    r = asyncio.run(mon.probe("good", good, batch=4))
    r = asyncio.run(mon.probe("good", good, batch=4))  # wraps around: 12 reads cover all 10 anchors
    assert r.drift.mean_rel_l2 == pytest.approx(0.5) and mon.readings["good"].cursor == 12 % K


def test_a_new_adapter_is_judged_on_what_was_read_against_the_base_on_the_same_anchors():
    mon, _ = make()
    bad = SimpleNamespace(name="bad")
    r = asyncio.run(mon.probe("bad", bad, batch=3))  # anchors 0, 1, 2: the base refuses 0 and 2
    assert r.coverage == pytest.approx(0.3) and r.refusal_ratio == 0.0
    assert r.base_refusal_ratio == pytest.approx(2 / 3) and r.refusal_drop == pytest.approx(2 / 3)
    assert r.verdict.status == "fail"
    mon.forget("bad")
    assert "bad" not in mon.readings


def test_gate_scores_come_back_in_prompt_order_per_adapter_and_a_missing_gate_is_an_error():
    mon, workers = make()
    prompts = [[5, 6, j] for j in range(6)]
    base = asyncio.run(mon.gate_scores(None, prompts))
    assert base.tolist() == [0.5 * j for j in range(6)]
    moved = asyncio.run(mon.gate_scores(SimpleNamespace(name="moved"), prompts))
    assert (moved - base).tolist() == [2.0] * 6
    workers.gate = False
    with pytest.raises(Exception, match="no score for 6 of 6"):
        asyncio.run(mon.gate_scores(None, prompts))


class SlowEngine(Engine):
    """Serves one request at a time, `delay` seconds each; `hang_after` requests, then never answers again."""

    def __init__(self, delay: float, hang_after: int | None = None) -> None:
        super().__init__()
        self.delay, self.hang_after, self.served = delay, hang_after, 0
        self.busy = asyncio.Lock()

    async def generate(self, inputs, params, request_id, lora_request=None):
        async with self.busy:
            if self.hang_after is not None and self.served >= self.hang_after:
                await asyncio.Event().wait()  # a hung engine
            await asyncio.sleep(self.delay)
            self.served += 1
        async for out in super().generate(inputs, params, request_id, lora_request):
            yield out


def test_a_slow_engine_finishes_a_large_probe_and_a_hung_one_fails_it_with_a_reason():
    """The timeout is a stall timeout: 40 prompts served one by one take far longer in all than the timeout
    allows (a calibration set on a slow CPU), and still complete; an engine that stops answering fails the
    probe with a message that says so, and its requests are aborted."""
    prompts = [[5, 6, j] for j in range(40)]
    engine = SlowEngine(delay=0.02)
    mon = Monitor(engine, Workers(engine), [[1, 2, i] for i in range(K)], DriftConfig(), Metrics(), timeout=0.4)
    scores = asyncio.run(mon.gate_scores(None, prompts))
    assert scores.tolist() == [0.5 * j for j in range(40)] and engine.served == 40

    hung = SlowEngine(delay=0.0, hang_after=3)
    mon = Monitor(hung, Workers(hung), [[1, 2, i] for i in range(K)], DriftConfig(), Metrics(), timeout=0.4)
    with pytest.raises(TimeoutError, match=r"no probe request finished in 0.4 s \(37 of 40 unfinished\)"):
        asyncio.run(mon.gate_scores(None, prompts))


class SharedEngine(Engine):
    """Engine time is shared: a request takes `per_request` seconds for every request in flight when it starts
    (a batch finishes together), and the most requests ever in flight at once are kept."""

    def __init__(self, per_request: float) -> None:
        super().__init__()
        self.per_request, self.in_flight, self.most = per_request, 0, 0

    async def generate(self, inputs, params, request_id, lora_request=None):
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            await asyncio.sleep(0)  # every request sent in this round joins the batch first
            await asyncio.sleep(self.per_request * self.in_flight)
        finally:
            self.in_flight -= 1
        async for out in super().generate(inputs, params, request_id, lora_request):
            yield out


def test_a_probe_sends_a_window_of_requests_so_a_slow_batched_engine_makes_visible_progress():
    """serve.probe_concurrency: 40 calibration prompts sent at once would share every step and finish together,
    after longer than the stall timeout (a slow engine taken for a hung one); four at a time, requests finish
    steadily and the probe completes, never more than four in flight."""
    prompts = [[5, 6, j] for j in range(40)]
    burst = SharedEngine(per_request=0.02)
    mon = Monitor(burst, Workers(burst), [[1, 2, i] for i in range(K)], DriftConfig(), Metrics(), timeout=0.4,
                  concurrency=len(prompts))
    with pytest.raises(TimeoutError, match="no probe request finished"):
        asyncio.run(mon.gate_scores(None, prompts))

    windowed = SharedEngine(per_request=0.02)
    mon = Monitor(windowed, Workers(windowed), [[1, 2, i] for i in range(K)], DriftConfig(), Metrics(), timeout=0.4,
                  concurrency=4)
    scores = asyncio.run(mon.gate_scores(None, prompts))
    assert scores.tolist() == [0.5 * j for j in range(40)] and windowed.most == 4


def test_the_periodic_probe_waits_longer_when_a_round_would_take_more_than_its_share():
    """serve.probe_max_share: a 5 s round at the 2400 s default is far under 1% and keeps the interval; a 40 s
    round (a slow CPU, four adapters) would be 1.7%, so the next waits 3960 s, and the share is then exactly 1%."""
    assert next_probe_delay(2400.0, 5.0, 0.01) == 2400.0
    wait = next_probe_delay(2400.0, 40.0, 0.01)
    assert wait == pytest.approx(3960.0) and 40.0 / (40.0 + wait) == pytest.approx(0.01)
    assert next_probe_delay(2400.0, 40.0, None) == 2400.0  # unset: the configured interval, whatever a round costs
