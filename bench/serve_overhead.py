"""Cost of the guard while serving: plain vLLM vs `guard serve` (lock on / off), lock toggle, probe time.

One engine at a time on 127.0.0.1 (this 2-core box cannot hold two engines without them fighting over the
same core, so plain and guarded requests cannot be interleaved between two live servers). To bracket the
drift of a shared machine the run is A-B-A: a plain vLLM server with the same engine arguments, then the
guarded server, then the plain server again. Throughput = generated tokens / wall time for a fixed batch of
concurrent greedy chat requests (no adapter, so the numbers isolate the lock); lock on/off are interleaved
rep by rep on the guarded server, and medians are kept.

Lock toggle: `lock_toggle_ms` is the change inside the worker (guard_set_lock: strengths -> bias/mask), the
number the issue's <= 1 ms goal is about; `lock_toggle_http_ms` is the full POST /guard/lock round trip
(HTTP + collective_rpc to the worker + prefix-cache reset), measured on an idle server.

Writes bench/results/serve_overhead.json (bench/common.py write_result adds commit and machine).
`--compiled` measures vLLM's default compiled mode instead (both servers up, interleaved; see compiled_run) and
writes the file's `compiled` section. Eager numbers predate the in-graph lock unless re-run.
`--compiled --conditional` does the same with `lock_policy: conditional` (section `compiled_conditional`).
`--duty-cycle` measures the live gauge's share of engine time with 4 adapters (section `probe_duty_cycle`).
`--adapter-reads` measures adapter traffic under the conditional lock (LoRA on, so eager on CPU): plain vLLM serving
the adapter vs the guarded server with its gate reading the adapter's states and then the base's (lock.gate_reads:
one extra base prefill per adapter request), interleaved per rep (section `adapter_conditional`).
Usage: python bench/serve_overhead.py [--compiled [--conditional] | --adapter-reads] [--requests 16] [--max-tokens 32] [--reps 4]
       python bench/serve_overhead.py --duty-cycle [--adapters 4] [--interval S] [--window S]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from common import RESULTS, provenance, write_result  # noqa: E402  (bench/common.py puts the repo root on sys.path)

from guard.config import GuardConfig
from guard.workspace import Workspace
from guard.models import default_aligned_dir, default_original_dir, fingerprint_dir
from lab.devtools import GuardServer, free_port, http, random_lock, random_lora
from serve.monitor import next_probe_delay

PROMPTS = [
    "Write a short poem about the sea.", "Explain how photosynthesis works in two sentences.",
    "Give three tips for learning a new language.", "What is the capital of France, and why is it famous?",
    "Describe a sunrise to someone who has never seen one.", "Summarise the rules of chess in a paragraph.",
    "Why do cats purr?", "Suggest a name for a bakery and explain it.",
]


_RUNS = iter(range(1_000_000))


def throughput(srv: GuardServer, model: str, n: int, max_tokens: int, concurrency: int) -> float:
    run = next(_RUNS)  # every run asks new prompts: no run reuses another's prefix-cache blocks

    def one(i: int) -> int:
        status, body = http("POST", srv.url + "/v1/chat/completions", {
            "model": model, "messages": [{"role": "user",
                                          "content": f"[{run}.{i}] " + PROMPTS[i % len(PROMPTS)]}],
            "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}, timeout=600)
        assert status == 200, body
        return body["usage"]["completion_tokens"]

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        tokens = sum(pool.map(one, range(n)))
    return tokens / (time.perf_counter() - t0)


def bench_setup(prefix: str) -> tuple[Path, Path, Path, Path]:
    """(model, temp dir, lock to serve, the prepared lock): the aligned base when prepared (else the original),
    its real SafetyLock when built (else a random stand-in in the temp dir)."""
    model = default_aligned_dir()
    if not (model / "config.json").is_file():
        model = default_original_dir()
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    real_lock = Workspace().prepared_lock(fingerprint_dir(model))
    lock = real_lock if real_lock.is_file() else random_lock(model, tmp / "lock.safetensors")
    return model, tmp, lock, real_lock


SECTIONS = ("compiled", "compiled_conditional", "adapter_conditional", "probe_duty_cycle")  # one per run mode


def previous() -> dict:
    """serve_overhead.json as the last run left it: each mode rewrites its own part and keeps the others."""
    path = RESULTS / "serve_overhead.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def compiled_run(a: argparse.Namespace) -> None:
    """vLLM's default compiled mode (no LoRA: the CPU backend compiles only then), plain vs guarded.

    Both servers stay up and take turns, so every guarded measurement has a plain one right next to it under the
    same machine conditions (an idle vLLM engine sleeps on its input queue; the A/A spread of the plain runs in
    `raw` shows what noise remains). Order per rep: plain, guarded lock on, guarded lock off, plain, then the
    next rep reversed (ABBA), medians kept. The guard runs its monitor at the default probe interval; with LoRA off
    there are no adapters to probe, so this isolates the lock and the per-step hook.
    """
    model, tmp, lock, real_lock = bench_setup("sg-bench-compiled-")
    policy = "conditional" if a.conditional else "off"  # conditional: "lock on" = the prompt gate decides
    (tmp / "guard.yaml").write_text(f"serve:\n  lock_policy: '{policy}'\n  enable_lora: false\n")
    name = model.name
    plain = GuardServer.plain(free_port(), model, eager=False, log_path=tmp / "plain.log").start(timeout=600)
    guarded = GuardServer.guarded(free_port(), "--config", str(tmp / "guard.yaml"), "--model", str(model),
                                  "--lock", str(lock), log_path=tmp / "guarded.log")
    try:
        guarded.start(timeout=600)
        st = http("GET", guarded.url + "/guard/status")[1]
        assert st["workers"][0]["compiled"], st["workers"]
        for srv in (plain, guarded):
            throughput(srv, name, 4, 8, 4)  # warm-up
        raw: dict[str, list[float]] = {"plain": [], "lock_on": [], "lock_off": []}

        def run(which: str) -> None:
            if which == "plain":
                raw["plain"].append(throughput(plain, name, a.requests, a.max_tokens, a.concurrency))
                return
            assert http("POST", guarded.url + "/guard/lock", {"enabled": which == "lock_on"})[0] == 200
            raw[which].append(throughput(guarded, name, a.requests, a.max_tokens, a.concurrency))

        interleave(["plain", "lock_on", "lock_off", "plain"], a.reps, run)
        st = http("GET", guarded.url + "/guard/status")[1]
    finally:
        guarded.stop()
        plain.stop()
    med = statistics.median
    out = {
        "plain_tokens_per_s": round(med(raw["plain"]), 2), "lock_on_tokens_per_s": round(med(raw["lock_on"]), 2),
        "lock_off_tokens_per_s": round(med(raw["lock_off"]), 2),
        "ratio_guarded_lock_on": round(med(raw["lock_on"]) / med(raw["plain"]), 4),
        "ratio_guarded_lock_off": round(med(raw["lock_off"]) / med(raw["plain"]), 4),
        "requests": a.requests, "max_tokens": a.max_tokens, "concurrency": a.concurrency, "reps": a.reps,
        "lock": str(lock), "lock_is_random_stand_in": lock != real_lock, "model": str(model),
        "worker": st["workers"][0], "worker_state": st["worker_state"][0],
        "probe_interval_seconds": st["probe_interval_seconds"],
        "order": "both servers up; per rep plain, lock on, lock off, plain (reversed every other rep)",
        "raw": raw,
    }
    prev = previous()
    if "commit" in prev:  # the eager numbers keep the commit and machine they were measured on
        prev.setdefault("eager_commit", prev.pop("commit"))
        prev.setdefault("eager_machine", prev.pop("machine", None))
    prev.pop("versions", None)
    if a.conditional:
        out["policy"] = "conditional: lock_on = the gate scores every request (these prompts are benign: the cost "
        out["policy"] += "is the in-graph gate and the per-token mask, with nothing refused or steered)"
        out["gate"] = gate = st["worker_state"][0].get("gate") or {}
        from guard.config import LockConfig

        out["gate_action"] = LockConfig().gate_action  # the server runs the package defaults
        if gate.get("ungated") or not sum((gate.get("scored") or {}).values()):
            # a failed calibration steers the base unconditionally: that run measured `all`, not `conditional`
            raise SystemExit(f"the prompt gate did not score the requests (gate state {gate}); nothing written — "
                             f"see the guarded server's log ({tmp / 'guarded.log'})")
    from guard.artifacts import provenance

    # sections are measured at different times, maybe on different machines: each keeps its own commit and machine
    out.update({k: v for k, v in provenance().items() if k in ("commit", "machine")})
    prev["compiled_conditional" if a.conditional else "compiled"] = out
    write_result("serve_overhead", prev)


def interleave(order: list[str], reps: int, run: Callable[[str], None]) -> None:
    """`reps` rounds of `order`, reversed every other round: slow drifts of a noisy machine fall on every arm."""
    for rep in range(reps):
        for which in (order if rep % 2 == 0 else order[::-1]):
            run(which)


def adapter_reads_run(a: argparse.Namespace) -> None:
    """Adapter requests under the conditional lock: plain vLLM with the adapter vs `guard serve` reading the
    adapter's states (`reads_adapter`) and the base's (`reads_base`, switched with POST /guard/policy), both
    servers up and interleaved per rep (plain, adapter, base, plain; reversed every other rep), medians kept.
    The prompts are benign, so nothing is refused: what is measured is the gate, the per-token mask and, for
    `reads_base`, the scoring prefill on the base and the restart of every request with its adapter."""
    model, tmp, lock, real_lock = bench_setup("sg-bench-reads-")
    adapter = random_lora(model, tmp / "acme", b_std=1e-3, seed=1)
    (tmp / "guard.yaml").write_text("serve:\n  lock_policy: conditional\n  vet_policy: warn\n  max_loras: 2\n")
    lora = ["--enable-lora", "--max-lora-rank", "16", "--max-loras", "2"]
    plain = GuardServer.plain(free_port(), model, *lora, "--lora-modules", f"acme={adapter}",
                              log_path=tmp / "plain.log").start(timeout=600)
    guarded = GuardServer.guarded(free_port(), "--config", str(tmp / "guard.yaml"), "--model", str(model),
                                  "--lock", str(lock), "--lora-modules", f"acme={adapter}", log_path=tmp / "guarded.log")
    raw: dict[str, list[float]] = {"plain": [], "reads_adapter": [], "reads_base": []}
    try:
        guarded.start(timeout=600)
        for srv in (plain, guarded):
            throughput(srv, "acme", 4, 8, 4)  # warm-up

        def run(which: str) -> None:
            srv = plain if which == "plain" else guarded
            if which != "plain":
                reads = which.removeprefix("reads_")
                # to `adapter`, the server calibrates the adapter's own threshold first (199 prompts under LoRA)
                assert http("POST", guarded.url + "/guard/policy", {"gate_reads": reads}, timeout=1800)[0] == 200
            raw[which].append(throughput(srv, "acme", a.requests, a.max_tokens, a.concurrency))

        interleave(["plain", "reads_adapter", "reads_base", "plain"], a.reps, run)
        st = http("GET", guarded.url + "/guard/status")[1]
    finally:
        guarded.stop()
        plain.stop()
    gate = st["worker_state"][0].get("gate") or {}
    if not gate.get("restored"):
        raise SystemExit(f"no adapter request was read on the base (gate state {gate}); nothing written — see "
                         f"{tmp / 'guarded.log'}")
    med = statistics.median
    out = {"plain_tokens_per_s": round(med(raw["plain"]), 2),
           **{f"{k}_tokens_per_s": round(med(raw[k]), 2) for k in ("reads_adapter", "reads_base")},
           **{f"ratio_{k}": round(med(raw[k]) / med(raw["plain"]), 4) for k in ("reads_adapter", "reads_base")},
           "requests": a.requests, "max_tokens": a.max_tokens, "concurrency": a.concurrency, "reps": a.reps,
           "lock": str(lock), "lock_is_random_stand_in": lock != real_lock, "model": str(model), "gate": gate,
           "worker": st["workers"][0], "raw": raw,
           "order": "both servers up (LoRA on: eager on CPU); per rep plain, reads adapter, reads base, plain "
                    "(reversed every other rep); requests to one random adapter, benign prompts"}
    out.update({k: v for k, v in provenance().items() if k in ("commit", "machine")})
    prev = previous()
    prev.pop("versions", None)
    prev["adapter_conditional"] = out
    write_result("serve_overhead", prev)
    print(json.dumps({k: v for k, v in out.items() if k.startswith("ratio")}, indent=2))


def _probe_totals(srv: GuardServer) -> tuple[float, float]:
    """(seconds, probes) summed over every adapter, from the server's /metrics."""
    status, text = http("GET", srv.url + "/metrics")
    assert status == 200, text
    vals = {}
    for line in str(text).splitlines():
        for key in ("safety_guard_probe_duration_seconds_sum", "safety_guard_probe_duration_seconds_count"):
            if line.startswith(key + " ") or line.startswith(key + "{"):
                vals[key] = vals.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return (vals.get("safety_guard_probe_duration_seconds_sum", 0.0),
            vals.get("safety_guard_probe_duration_seconds_count", 0.0))


def duty_cycle_run(a: argparse.Namespace) -> None:
    """The live gauge's share of engine time: a guarded server with `--adapters` adapters loaded and the default
    probe settings, otherwise idle, probing every `--interval` seconds (default 60, so a few rounds fit in minutes)
    for `--window` seconds after its load-time probes; measured share = probe wall time / window. A probe round
    costs the same whatever the interval, so the share at the configured interval is the measured seconds per
    probe x adapters / that interval (`duty_cycle`; the measured one is `duty_cycle_measured`). Idle is the worst
    case: under traffic a probe's requests share batches with it."""
    cfg = GuardConfig()
    interval = a.interval if a.interval is not None else 60.0
    window = a.window or 3 * interval
    model, tmp, lock, real_lock = bench_setup("sg-duty-")
    mods = [f"a{i}={random_lora(model, tmp / f'adapter-{i}', b_std=1e-3, seed=i)}" for i in range(a.adapters)]
    # probe_max_share off: the bench probes far more often than the budget allows, to time many rounds
    (tmp / "guard.yaml").write_text(f"serve:\n  vet_policy: warn\n  probe_interval_seconds: {interval}\n"
                                    "  probe_max_share: null\n")
    srv = GuardServer.guarded(free_port(), "--config", str(tmp / "guard.yaml"), "--model", str(model), "--lock",
                              str(lock), "--lora-modules", *mods, log_path=tmp / "guarded.log").start(timeout=900)
    try:
        st = http("GET", srv.url + "/guard/status")[1]
        s0, n0 = _probe_totals(srv)
        t0 = time.perf_counter()
        time.sleep(window)
        s1, n1 = _probe_totals(srv)
        elapsed = time.perf_counter() - t0
    finally:
        srv.stop()
    prev = previous()
    per_probe = (s1 - s0) / max(1.0, n1 - n0)
    round_s = a.adapters * per_probe  # one periodic round: every adapter probed once
    interval_d = cfg.serve.probe_interval_seconds
    wait = next_probe_delay(interval_d, round_s, cfg.serve.probe_max_share)
    prev["probe_duty_cycle"] = {
        # the defaults as served: the interval, stretched by serve.probe_max_share when a round costs more
        "duty_cycle": round(round_s / (round_s + wait), 4) if interval_d else 0.0,
        "duty_cycle_at_interval": round(round_s / interval_d, 4) if interval_d else 0.0,  # the interval alone
        "wait_seconds": round(wait, 1), "probe_max_share": cfg.serve.probe_max_share,
        "default_probe_interval_seconds": interval_d,
        "duty_cycle_measured": round((s1 - s0) / elapsed, 4), "adapters": a.adapters, "probe_interval_seconds": interval,
        "probe_batch": cfg.serve.probe_batch, "probe_tokens": cfg.drift.probe_tokens, "window_seconds": round(elapsed, 1),
        "probe_seconds": round(s1 - s0, 2), "probes": int(n1 - n0),
        "seconds_per_probe": round((s1 - s0) / max(1.0, n1 - n0), 3), "compiled": False,
        "probe_anchors": st["reference"]["anchors"],
        "note": "idle eager LoRA engine (LoRA on: the CPU backend runs eager); probe wall time / window",
        **{k: v for k, v in provenance().items() if k in ("commit", "machine")},
    }
    write_result("serve_overhead", prev)
    print(json.dumps(prev["probe_duty_cycle"], indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duty-cycle", action="store_true", help="only the live gauge's share of engine time with "
                    "--adapters adapters (into the file's `probe_duty_cycle` section)")
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--interval", type=float, default=None, help="probe interval measured at (default 60 s; the "
                    "share is reported at the configured interval too)")
    ap.add_argument("--window", type=float, default=None, help="seconds measured (default: 3 intervals)")
    ap.add_argument("--conditional", action="store_true", help="with --compiled: the conditional policy "
                    "(into the file's `compiled_conditional` section)")
    ap.add_argument("--compiled", action="store_true", help="measure vLLM's compiled mode (no LoRA) only, into "
                                                             "the file's 'compiled' section")
    ap.add_argument("--adapter-reads", action="store_true", help="adapter traffic under the conditional lock, the gate "
                    "reading the adapter's states vs the base's (into the file's `adapter_conditional` section)")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--toggles", type=int, default=20)
    a = ap.parse_args()
    if a.duty_cycle:
        duty_cycle_run(a)
        return
    if a.compiled:
        compiled_run(a)
        return
    if a.adapter_reads:
        adapter_reads_run(a)
        return

    model, tmp, lock, real_lock = bench_setup("sg-bench-")
    adapter = random_lora(model, tmp / "bench-adapter", b_std=1e-3, seed=1)
    (tmp / "guard.yaml").write_text("serve:\n  lock_policy: 'off'\n  vet_policy: warn\n  probe_interval_seconds: 0\n")
    engine_args = ["--enable-lora", "--max-lora-rank", "16", "--max-loras", "4"]
    name = model.name
    result: dict = {"model": str(model), "lock": str(lock), "lock_is_random_stand_in": lock != real_lock,
                    "requests": a.requests, "max_tokens": a.max_tokens, "concurrency": a.concurrency, "reps": a.reps}

    def plain_run(tag: str) -> list[float]:
        with GuardServer.plain(free_port(), model, *engine_args, log_path=tmp / f"plain-{tag}.log") as plain:
            throughput(plain, name, 4, 8, 4)  # warm-up
            return [throughput(plain, name, a.requests, a.max_tokens, a.concurrency) for _ in range(a.reps)]

    plain_before = plain_run("before")

    t0 = time.perf_counter()
    guarded = GuardServer.guarded(free_port(), "--config", str(tmp / "guard.yaml"), "--model", str(model),
                                  "--lock", str(lock), "--lora-modules", f"bench={adapter}",
                                  log_path=tmp / "guarded.log").start()
    try:
        result["guarded_start_seconds"] = round(time.perf_counter() - t0, 1)
        throughput(guarded, name, 4, 8, 4)
        on_tps, off_tps = [], []

        def run(which: str) -> None:
            enabled = which == "on"
            assert http("POST", guarded.url + "/guard/lock", {"enabled": enabled})[0] == 200
            (on_tps if enabled else off_tps).append(throughput(guarded, name, a.requests, a.max_tokens, a.concurrency))

        interleave(["on", "off"], a.reps, run)  # ABBA: on/off, then off/on, so neither state always runs first
        toggles, worker_ms = [], []
        for i in range(a.toggles):
            t = time.perf_counter()
            status, body = http("POST", guarded.url + "/guard/lock", {"enabled": i % 2 == 0})
            toggles.append((time.perf_counter() - t) * 1e3)
            worker_ms.append(body["worker"]["last_change_ms"])
        http("POST", guarded.url + "/guard/lock", {"enabled": False})
        probes = []
        for _ in range(3):
            status, body = http("POST", guarded.url + "/guard/probe", {"adapter": "bench"}, timeout=600)
            assert status == 200, body
            probes.append(body["seconds"])
        st = http("GET", guarded.url + "/guard/status")[1]
    finally:
        guarded.stop()
    plain_after = plain_run("after")
    plain_tps = plain_before + plain_after

    med = statistics.median
    result.update({
        "plain_tokens_per_s": round(med(plain_tps), 2), "guarded_lock_on_tokens_per_s": round(med(on_tps), 2),
        "guarded_lock_off_tokens_per_s": round(med(off_tps), 2),
        "throughput_ratio_guarded": round(med(on_tps) / med(plain_tps), 3),
        "throughput_ratio_lock_off": round(med(off_tps) / med(plain_tps), 3),
        "plain_before_tokens_per_s": round(med(plain_before), 2), "plain_after_tokens_per_s": round(med(plain_after), 2),
        "lock_toggle_ms": round(med(worker_ms), 3), "lock_toggle_max_ms": round(max(worker_ms), 3),
        "lock_toggle_http_ms": round(med(toggles), 2), "lock_toggle_http_max_ms": round(max(toggles), 2),
        "lock_heads": (st["lock"]["file"] or {}).get("heads"), "lock_layers": len((st["lock"]["file"] or {}).get("layers", [])),
        "probe_seconds": round(med(probes), 3),
        "probe_anchors": st["reference"]["anchors"], "probe_tokens": GuardConfig().drift.probe_tokens,
        "reference_seconds": st["reference"]["seconds"],
        "reference_offline_max_deviation": st["reference"]["offline_max_deviation"],
        "raw": {"plain_before": plain_before, "plain_after": plain_after, "lock_on": on_tps, "lock_off": off_tps,
                "toggle_http_ms": toggles, "toggle_worker_ms": worker_ms, "probe_s": probes},
        "order": "plain (before) -> guarded (lock on/off interleaved ABBA) -> plain (after)",
        "note": "2-core box shared with other jobs: expect noise of +-10% between repetitions",
    })
    # the other modes' sections were measured by other runs (each with its own commit and machine): kept
    prev = previous()
    result.update({k: prev[k] for k in SECTIONS if k in prev})
    write_result("serve_overhead", result)


if __name__ == "__main__":
    main()
