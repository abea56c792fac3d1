"""Concurrent-load acceptance of the guarded server: no user request may fail while the guard works.

ONE `guard serve` on the aligned base with the real SafetyLock (lock policy `adapters`, steering the start-up
adapter; monitor at its default interval), 8 client threads on 127.0.0.1 sending short greedy chat
completions for `--seconds` and on until the last admin action has returned (mixed: base model, the
start-up adapter, and the hot-loaded adapter once the gate has let it in). In the same window three admin
threads act independently: one toggles the lock (default on/off, per-adapter on/off, strength) through
`POST /guard/lock`, one calls `POST /guard/probe`, one hot-loads a second adapter through
`POST /v1/load_lora_adapter` (vetted by the gate: probed under load, then served) and then locks it.

Adapters are made here: random peft-format LoRAs of the aligned base with small B (anchor drift far below
the warn threshold), one given at start-up, one hot-loaded.

Counts every user request as ok / HTTP error / exception, per-client latency, the admin actions with status
codes and times (seconds since the window opened), the guard's own view at the end (/guard/status,
probe-failure counters), and any traceback in the server log. Writes bench/results/serve_load.json.
Usage: python bench/serve_load.py [--seconds 60] [--clients 8] [--max-tokens 12]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import write_result  # noqa: E402  (bench/common.py puts the repo root on sys.path)

from guard.workspace import Workspace
from guard.models import default_aligned_dir, fingerprint_dir
from lab.devtools import GuardServer, free_port, http, random_lora

PROMPTS = [
    "Write a short poem about the sea.", "Explain how photosynthesis works in two sentences.",
    "Give three tips for learning a new language.", "What is the capital of France?",
    "Describe a sunrise to someone who has never seen one.", "Why do cats purr?",
    "Suggest a name for a bakery and explain it.",
    # longer than a KV block after templating: the prefix-cache reset on lock changes matters for these
    ("You are helping a small bakery. They sell bread, cakes, and pastries, open at seven, close at six, and "
     "want a friendly sentence for their shop window that mentions the fresh bread every morning. Write it."),
]
START_ADAPTER, HOT_ADAPTER = "tenant-a", "tenant-b"


class Load:
    """Shared state of one run: the clients' outcomes and the admin log."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.mu = threading.Lock()
        self.models: list[str] = []
        self.ok = self.http_errors = self.exceptions = 0
        self.failures: list[dict[str, Any]] = []
        self.by_model: dict[str, dict[str, int]] = {}
        self.latency: dict[int, list[float]] = {}
        self.admin: list[dict[str, Any]] = []

    def now(self) -> float:
        return round(time.perf_counter() - self.t0, 3)

    def record(self, client: int, model: str, outcome: str, seconds: float, detail: Any = None) -> None:
        with self.mu:
            setattr(self, outcome, getattr(self, outcome) + 1)
            self.by_model.setdefault(model, {"ok": 0, "http_errors": 0, "exceptions": 0})[outcome] += 1
            if outcome == "ok":
                self.latency.setdefault(client, []).append(seconds)
            else:
                self.failures.append({"t": self.now(), "client": client, "model": model, "outcome": outcome,
                                      "detail": str(detail)[:500]})


def client(srv: GuardServer, load: Load, idx: int, until: Any, max_tokens: int) -> None:
    i = 0
    while until():
        with load.mu:
            models = list(load.models)
        model = models[(idx + i) % len(models)]
        prompt = PROMPTS[(idx * 3 + i) % len(PROMPTS)]
        t = time.perf_counter()
        try:
            status, body = http("POST", srv.url + "/v1/chat/completions", {
                "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                "temperature": 0.0}, timeout=300)
            dt = time.perf_counter() - t
            if status == 200 and body["choices"][0]["message"]["content"] is not None:
                load.record(idx, model, "ok", dt)
            else:
                load.record(idx, model, "http_errors", dt, f"{status}: {body}")
        except Exception as e:  # noqa: BLE001 (a bench counts every way a request can fail)
            load.record(idx, model, "exceptions", time.perf_counter() - t, f"{type(e).__name__}: {e}")
        i += 1


def admin_call(srv: GuardServer, load: Load, what: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    t = time.perf_counter()
    entry: dict[str, Any] = {"t": load.now(), "action": what, "path": path, "body": body}
    try:
        status, resp = http("POST", srv.url + path, body, timeout=600)
        entry["status"] = status
        if path == "/guard/lock" and isinstance(resp, dict) and status == 200:
            worker = resp.get("worker") or {}
            entry.update(server_ms=resp.get("toggle_ms"), worker_change_ms=worker.get("last_change_ms"),
                         worker_mode=worker.get("mode"), cache_reset=resp.get("last_prefix_cache_reset"))
        elif path == "/guard/probe" and isinstance(resp, dict) and status == 200:
            keys = ("adapter", "drift", "refusal_ratio", "status", "seconds", "error")
            entry["result"] = ({k: resp.get(k) for k in keys} if "drift" in resp else
                               {n: {k: r.get(k) for k in keys} for n, r in resp.items()})
        else:
            entry["response"] = (resp if isinstance(resp, str) else json.dumps(resp))[:400]
    except Exception as e:  # noqa: BLE001
        entry["status"] = None
        entry["error"] = f"{type(e).__name__}: {e}"
    entry["seconds"] = round(time.perf_counter() - t, 3)
    with load.mu:
        load.admin.append(entry)
    print(f"[admin] {entry['t']:7.2f}s {what}: {entry['status']} ({entry['seconds']} s)", flush=True)
    return entry


def run_plan(srv: GuardServer, load: Load, plan: list[tuple[float, str, str, dict[str, Any]]], k: float) -> None:
    """One operator thread: its actions in order, each no earlier than its time (scaled by k)."""
    for at, what, path, body in plan:
        wait = load.t0 + at * k - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        entry = admin_call(srv, load, what, path, body)
        if path == "/v1/load_lora_adapter" and entry.get("status") == 200:
            with load.mu:
                load.models.append(body["lora_name"])  # clients start using it once the gate let it in


def admin_plans(base: str, hot_dir: Path) -> list[list[tuple[float, str, str, dict[str, Any]]]]:
    """Three operators acting independently (times in seconds of a 60 s window): lock changes, probes, and
    a hot-load. Probes and the vetting probe of a hot-load take tens of seconds under load, so they run in
    their own threads and lock changes land while they are in flight."""
    lock = [
        (3, "lock default on", "/guard/lock", {"enabled": True}),
        (9, "lock strength 0.5", "/guard/lock", {"strength": 0.5}),
        (15, "lock base off", "/guard/lock", {"adapter": base, "enabled": False}),
        (21, "lock strength 1.0", "/guard/lock", {"strength": 1.0}),
        (27, "lock start-up adapter off", "/guard/lock", {"adapter": START_ADAPTER, "enabled": False}),
        (33, "lock default off", "/guard/lock", {"enabled": False}),
        (39, "lock start-up adapter on", "/guard/lock", {"adapter": START_ADAPTER, "enabled": True}),
        (45, "lock base on 2.0", "/guard/lock", {"adapter": base, "enabled": True, "strength": 2.0}),
        (51, "lock default on", "/guard/lock", {"enabled": True}),
        (55, "lock default off", "/guard/lock", {"enabled": False}),
    ]
    probes = [
        (6, "probe start-up adapter", "/guard/probe", {"adapter": START_ADAPTER}),
        (40, "probe all adapters", "/guard/probe", {}),
    ]
    hot = [
        (10, "hot-load adapter", "/v1/load_lora_adapter", {"lora_name": HOT_ADAPTER, "lora_path": str(hot_dir)}),
        (48, "lock hot adapter on", "/guard/lock", {"adapter": HOT_ADAPTER, "enabled": True, "strength": 1.0}),
    ]
    return [lock, probes, hot]


def scrape(text: str, name: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                out[s.labels.get("adapter") or s.labels.get("reason") or ""] = s.value
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--lock-policy", choices=("adapters", "all"), default="adapters")
    a = ap.parse_args()

    model = default_aligned_dir()
    if not (model / "config.json").is_file():
        raise SystemExit(f"aligned base missing ({model}): run `guard prepare`")
    lock = Workspace().prepared_lock(fingerprint_dir(model))
    if not lock.is_file():
        raise SystemExit(f"SafetyLock missing ({lock}): run `guard lock build`")
    tmp = Path(tempfile.mkdtemp(prefix="sg-load-"))
    start_dir = random_lora(model, tmp / START_ADAPTER, rank=8, b_std=1e-3, seed=11)
    hot_dir = random_lora(model, tmp / HOT_ADAPTER, rank=8, b_std=1e-3, seed=12)
    lock_adapters = f"  lock_adapters: [{START_ADAPTER}]\n" if a.lock_policy == "adapters" else ""
    (tmp / "guard.yaml").write_text(f"serve:\n  lock_policy: {a.lock_policy}\n{lock_adapters}  vet_policy: reject\n")
    log_path = tmp / "guarded.log"

    t_start = time.perf_counter()
    srv = GuardServer.guarded(free_port(), "--config", str(tmp / "guard.yaml"), "--model", str(model),
                              "--lock", str(lock), "--lora-modules", f"{START_ADAPTER}={start_dir}",
                              log_path=log_path)
    srv.start(timeout=400)
    try:
        start_seconds = time.perf_counter() - t_start
        st0 = http("GET", srv.url + "/guard/status")[1]
        print(f"[load] server up in {start_seconds:.1f} s; errors: {st0['errors']}", flush=True)
        http("POST", srv.url + "/v1/chat/completions", {"model": model.name, "messages": [
            {"role": "user", "content": "Hi"}], "max_tokens": 4})  # warm-up
        load = Load(time.perf_counter())
        load.models = [model.name, START_ADAPTER]
        k = a.seconds / 60.0
        admins = [threading.Thread(target=run_plan, args=(srv, load, plan, k))
                  for plan in admin_plans(model.name, hot_dir)]
        done = threading.Event()

        def until() -> bool:  # clients run for --seconds, and on until every admin action has returned
            return time.perf_counter() < load.t0 + a.seconds or not done.is_set()

        threads = [threading.Thread(target=client, args=(srv, load, i, until, a.max_tokens)) for i in range(a.clients)]
        for t in [*threads, *admins]:
            t.start()
        for t in admins:
            t.join()
        done.set()
        for t in threads:
            t.join()
        window = time.perf_counter() - load.t0
        st = http("GET", srv.url + "/guard/status")[1]
        metrics_text = http("GET", srv.url + "/metrics")[1]
        log_text = log_path.read_text(errors="replace")  # before shutdown: only what happened under load
    finally:
        srv.stop()

    tracebacks = log_text.count("Traceback (most recent call last)")
    error_lines = [ln for ln in log_text.splitlines() if " ERROR " in ln or ln.startswith("ERROR")][:20]
    lat_all = [x for v in load.latency.values() for x in v]
    per_client = {str(c): {"ok": len(v), "median_s": round(statistics.median(v), 3), "max_s": round(max(v), 3)}
                  for c, v in sorted(load.latency.items())}
    total = load.ok + load.http_errors + load.exceptions
    result = {
        "model": str(model), "lock": str(lock), "lock_policy": a.lock_policy, "lock_adapters":
        [START_ADAPTER] if a.lock_policy == "adapters" else [], "vet_policy": "reject",
        "probe_interval_seconds": st0["probe_interval_seconds"], "clients": a.clients, "seconds_min": a.seconds,
        "window_seconds": round(window, 2), "max_tokens": a.max_tokens, "server_start_seconds": round(start_seconds, 1),
        "requests": {"total": total, "ok": load.ok, "http_errors": load.http_errors, "exceptions": load.exceptions,
                     "failed": load.http_errors + load.exceptions, "by_model": load.by_model},
        "throughput_requests_per_s": round(load.ok / window, 3),
        "latency_s": {"median": round(statistics.median(lat_all), 3) if lat_all else None,
                      "p95": round(sorted(lat_all)[int(0.95 * (len(lat_all) - 1))], 3) if lat_all else None,
                      "max": round(max(lat_all), 3) if lat_all else None, "per_client": per_client},
        "admin_actions_total": len(load.admin),
        "failures": load.failures[:50],
        "admin_actions": load.admin,
        "admin_failed": [e["action"] for e in load.admin if e.get("status") != 200],
        "guard_end": {"errors": st["errors"], "lock": {k: st["lock"][k] for k in ("installed", "policy", "default_on",
                                                                              "strength", "base_strength")},
                      "lock_heads": (st["lock"]["file"] or {}).get("heads"),
                      "adapters": {n: {"vetting": v["vetting"], "lock_strength": v["lock_strength"],
                                       "probe": v["probe"], "probe_error": v["probe_error"]}
                                   for n, v in st["adapters"].items()},
                      "reference": st["reference"]},
        "probe_failures_total": scrape(metrics_text, "safety_guard_probe_failures_total"),
        "probes_observed": scrape(metrics_text, "safety_guard_probe_duration_seconds_count"),
        "server_log": {"tracebacks": tracebacks, "error_lines": error_lines},
        "note": "2 CPU cores shared with another engineer's training job; latencies include that contention",
    }
    write_result("serve_load", result)


if __name__ == "__main__":
    main()
