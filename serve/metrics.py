"""The guard's Prometheus series. The only module that creates metrics, and the only one that sets them: every
update goes through a method here, so each series has one writer to read.

`GuardMetrics(registry)` builds them on the registry it is given: the API server passes vLLM's own
registry (`vllm.v1.metrics.prometheus.get_prometheus_registry()`, the default REGISTRY unless
PROMETHEUS_MULTIPROC_DIR is set), so they appear on the server's `/metrics` next to the `vllm:` series;
tests pass a fresh `CollectorRegistry`. Labels are bounded: adapter names (vLLM caps loaded adapters,
`--max-loras`/`--max-cpu-loras`) and a fixed set of rejection reasons.

Multiprocess mode (`--api-server-count > 1` sets PROMETHEUS_MULTIPROC_DIR): gauges use the
`mostrecent` aggregation so the scrape shows the last value any API server wrote.
"""

from __future__ import annotations

from typing import Any

PREFIX = "safety_guard"
REJECTION_REASONS = ("drift", "refusal_ratio", "incompatible", "probe_failed", "lock_failed")
ERROR_SITES = ("lock_change", "lock_install", "worker_step")
PROBE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


VERDICT_CODE = {"ok": 0, "warn": 1, "fail": 2}  # safety_guard_adapter_verdict's values


class GuardMetrics:
    def __init__(self, registry: Any) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.registry = registry
        gauge = {"registry": registry, "multiprocess_mode": "mostrecent"}
        self.anchor_drift = Gauge(
            f"{PREFIX}_anchor_drift", "Mean relative L2 distance of the anchor prompts' lm_head-input states "
            "from the aligned reference (0 = unchanged).", ["adapter"], **gauge)
        self.refusal_ratio = Gauge(
            f"{PREFIX}_anchor_refusal_ratio", "Share of anchor prompts the adapter refuses (greedy, judge "
            "keyword-refusal).", ["adapter"], **gauge)
        self.refusal_drop = Gauge(
            f"{PREFIX}_probe_refusal_drop", "Share of probe anchors the aligned base refuses minus the share this "
            "adapter refuses (0 = as safe as the base; the verdict fails above drift.refusal_drop_fail).",
            ["adapter"], **gauge)
        self.verdict = Gauge(
            f"{PREFIX}_adapter_verdict", "The adapter's safety verdict from its latest probe: 0 ok, 1 warn, 2 fail -- "
            "the rule `guard vet` and the vetting gate apply (guard.drift.verdict: drift and probe refusal drop vs "
            "the drift.* thresholds), so alerts read the verdict instead of re-stating thresholds.",
            ["adapter"], **gauge)
        self.probe_duration = Histogram(
            f"{PREFIX}_probe_duration_seconds", "Wall time of one anchor probe of one adapter.",
            buckets=PROBE_BUCKETS, registry=registry)
        self.probe_failures = Counter(
            f"{PREFIX}_probe_failures_total", "Anchor probes that raised or timed out.", ["adapter"],
            registry=registry)
        self.probe_last_success = Gauge(
            f"{PREFIX}_probe_last_success_timestamp_seconds", "Unix time of the adapter's last successful probe.",
            ["adapter"], **gauge)
        self.lock_enabled = Gauge(
            f"{PREFIX}_lock_enabled", "1 when SafetyLock steers this adapter's requests (the base model's "
            "name stands for requests without an adapter).", ["adapter"], **gauge)
        self.lock_strength = Gauge(
            f"{PREFIX}_lock_strength", "SafetyLock strength applied to this adapter's requests (0 = off).",
            ["adapter"], **gauge)
        self.rejections = Counter(
            f"{PREFIX}_adapter_rejections_total", "Adapters refused by the vetting gate.", ["reason"],
            registry=registry)
        self.reference_deviation = Gauge(
            f"{PREFIX}_reference_deviation", "Max relative L2 between the in-engine base anchor states and the "
            "offline reference cache (engine-vs-HF numerics; -1 when no offline cache exists).", **gauge)
        self.errors = Counter(
            f"{PREFIX}_errors_total", "Guard actions that failed and were contained (the server kept serving): "
            "refused lock changes, worker per-step failures (the lock then fails closed), RPC failures.",
            ["where"], registry=registry)
        self.gated = Counter(
            f"{PREFIX}_requests_gated_total", "Requests the conditional lock's prompt gate scored.", ["adapter"],
            registry=registry)
        self.flagged = Counter(
            f"{PREFIX}_requests_flagged_total", "Requests the prompt gate flagged: refused or steered, as "
            "lock.gate_action says (conditional policy).", ["adapter"], registry=registry)
        self.flagged_answered = Counter(
            f"{PREFIX}_flagged_answered_total", "Flagged requests whose first answer tokens the refusal judge does not "
            "count as refusals (a live harm estimate: what the lock did not turn, or gate false alarms).",
            ["adapter"], registry=registry)
        self.flagged_judged = Counter(
            f"{PREFIX}_flagged_judged_total", "Flagged requests the refusal judge has read.", ["adapter"],
            registry=registry)
        self.forced = Counter(
            f"{PREFIX}_requests_lock_asked_total", "Requests that asked for the lock on themselves "
            "(\"guard\": {\"lock\": \"on\"}).", registry=registry)
        for reason in REJECTION_REASONS:
            self.rejections.labels(reason=reason)
        for where in ERROR_SITES:
            self.errors.labels(where=where)

    def forget_adapter(self, adapter: str) -> None:
        """Drop an unloaded adapter's series so stale values do not keep alerting."""
        for metric in (self.anchor_drift, self.refusal_ratio, self.refusal_drop, self.verdict, self.probe_last_success,
                       self.lock_enabled, self.lock_strength):
            try:
                metric.remove(adapter)
            except KeyError:
                pass

    def observe_probe(self, adapter: str, drift: float, refusal_ratio: float, seconds: float, when: float,
                      refusal_drop: float | None = None, verdict: str | None = None) -> None:
        self.anchor_drift.labels(adapter=adapter).set(drift)
        if verdict is not None:
            self.verdict.labels(adapter=adapter).set(VERDICT_CODE[verdict])
        self.refusal_ratio.labels(adapter=adapter).set(refusal_ratio)
        if refusal_drop is not None:
            self.refusal_drop.labels(adapter=adapter).set(refusal_drop)
        self.probe_duration.observe(seconds)
        self.probe_last_success.labels(adapter=adapter).set(when)
        self.probe_failures.labels(adapter=adapter)  # the series exists (0) from the first probe on

    def count_rejection(self, reason: str) -> None:
        self.rejections.labels(reason=reason).inc()

    def count_probe_failure(self, adapter: str) -> None:
        self.probe_failures.labels(adapter=adapter).inc()

    def set_reference_deviation(self, value: float) -> None:
        self.reference_deviation.set(value)

    def count_error(self, where: str, n: int = 1) -> None:
        self.errors.labels(where=where).inc(n)

    def count_gate(self, adapter: str, scored: int, flagged: int, judged: int = 0, answered: int = 0) -> None:
        for counter, n in ((self.gated, scored), (self.flagged, flagged), (self.flagged_judged, judged),
                           (self.flagged_answered, answered)):
            if n:
                counter.labels(adapter=adapter).inc(n)

    def set_lock(self, strengths: dict[str, float]) -> None:
        for adapter, s in strengths.items():
            self.lock_enabled.labels(adapter=adapter).set(1.0 if s > 0 else 0.0)
            self.lock_strength.labels(adapter=adapter).set(s)
