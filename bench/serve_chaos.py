"""Chaos test of the guarded server: user traffic must never fail while the guard is pushed around.

One `guard serve` on 127.0.0.1 (loopback only), bounded in time. For `--seconds` (default 300):
- `--clients` (default 8) threads send greedy chat requests without pause, alternating the base model and a
  benign adapter that stays loaded ("good"); every non-200 answer or transport error counts as `failed`;
- one admin thread acts every `--interval` seconds (default 2), cycling through: lock on / off / a random
  strength / per-adapter on and off, vet-policy changes, probes now, loading and unloading a second benign
  adapter, and loading bad adapters (NaN weights, a rank above --max-lora-rank, an adapter for another base,
  a truncated safetensors file, a missing dir) and bad lock files (another base's, a non-lock file). Bad input
  must get a 4xx with a message; an admin action that gets a 5xx or no answer counts as `admin_failed`;
- the server process is watched: if it exits or /health stops answering, `engine_restarts` counts it and the
  run stops (vLLM does not restart a dead engine, so one death is one lost server).

Writes bench/results/serve_chaos[-<dtype>].json with requests, failed, admin_actions, admin_failed,
engine_restarts, dtype, mode and per-action counts. Goal: failed == 0 and engine_restarts == 0.
Usage: python bench/serve_chaos.py [--seconds 300] [--dtype bfloat16|float32] [--no-lora]
"""

from __future__ import annotations

import argparse
import collections
import itertools
import random
import tempfile
import threading
import time
from pathlib import Path

from common import write_result  # noqa: E402  (puts the repo root on sys.path)

from guard.models import default_aligned_dir, default_original_dir
from lab.devtools import GuardServer, free_port, http, random_lock, random_lora

PROMPTS = ["Write a short poem about the sea.", "Explain how photosynthesis works in two sentences.",
           "Give three tips for learning a new language.", "Why do cats purr?",
           "Summarise the rules of chess in a paragraph.", "Suggest a name for a bakery and explain it."]
CONFIG = """\
anchors:
  k: 4
drift:
  probe_tokens: 8
  min_refusal_ratio: 0.0
lock:
  strength: 1.0
serve:
  probe_interval_seconds: {probe}
  probe_max_share: null  # probe at the interval whatever a round costs: the churn is the point
  vet_policy: reject
  enable_lora: {lora}
  max_loras: 4
"""


def bad_artifacts(model: Path, tmp: Path) -> dict[str, Path]:
    """Everything a careless or hostile operator could hand the server."""
    import torch
    from safetensors.torch import load_file, save_file

    nan = random_lora(model, tmp / "nan", seed=11)
    w = load_file(str(nan / "adapter_model.safetensors"))
    first = next(iter(w))
    w[first] = torch.full_like(w[first], float("nan"))
    save_file(w, str(nan / "adapter_model.safetensors"))
    truncated = random_lora(model, tmp / "truncated", seed=12)
    f = truncated / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    other_base = tmp / "other-base"
    other_base.mkdir(exist_ok=True)
    return {
        "nan": nan, "truncated": truncated,
        "rank64": random_lora(model, tmp / "rank64", rank=64, seed=13),
        "alien": random_lora(model, tmp / "alien", hidden=64, seed=14),
        "missing": tmp / "no-such-adapter",
        "foreign_lock": random_lock(model, tmp / "foreign-lock.safetensors", fingerprint="f" * 64),
        "not_a_lock": nan / "adapter_model.safetensors",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=300.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--interval", type=float, default=2.0, help="seconds between admin actions")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--no-lora", action="store_true", help="serve without LoRA (compiled on CPU); no adapter churn")
    ap.add_argument("--probe-interval", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    aligned = default_aligned_dir()
    model = aligned if (aligned / "config.json").is_file() else default_original_dir()
    lora = not args.no_lora
    tmp = Path(tempfile.mkdtemp(prefix="sg-chaos-"))
    (tmp / "guard.yaml").write_text(CONFIG.format(probe=args.probe_interval, lora=str(lora).lower()))
    lock = random_lock(model, tmp / "lock.safetensors", heads=12, strength=6.0)
    good, good2 = random_lora(model, tmp / "good", seed=1), random_lora(model, tmp / "good2", seed=2)
    bad = bad_artifacts(model, tmp)
    guard_args = ["--config", str(tmp / "guard.yaml"), "--model", str(model), "--lock", str(lock)]
    if lora:
        guard_args += ["--lora-modules", f"good={good}"]
    srv = GuardServer.guarded(free_port(), *guard_args, "--", "--dtype", args.dtype, log_path=tmp / "server.log")
    srv.start(timeout=600)
    base = model.name
    targets = [base, "good"] if lora else [base]
    stats = collections.Counter()
    actions = collections.Counter()
    refused = collections.Counter()
    failures: list[str] = []
    stop = threading.Event()
    lock_ = threading.Lock()

    def client(i: int) -> None:
        n = 0
        while not stop.is_set():
            target = targets[(i + n) % len(targets)]
            n += 1
            try:
                status, body = http("POST", srv.url + "/v1/chat/completions", {
                    "model": target, "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
                    "max_tokens": 24, "temperature": 0.0}, timeout=300)
                ok = status == 200
            except Exception as e:  # transport error: the server did not answer
                ok, status, body = False, -1, repr(e)
            with lock_:
                stats["requests"] += 1
                if not ok:
                    stats["failed"] += 1
                    failures.append(f"{target}: {status} {str(body)[:200]}")

    bad_cycle = itertools.cycle(["nan", "truncated", "rank64", "alien", "missing"])

    def admin_once() -> None:
        kind = rng.choice(["lock_on", "lock_off", "strength", "adapter_lock", "policy", "probe", "load_good",
                           "unload_good", "bad_adapter", "bad_lock", "status"] if lora else
                          ["lock_on", "lock_off", "strength", "probe", "bad_lock", "status"])
        if kind == "lock_on":
            req = ("POST", "/guard/lock", {"enabled": True})
        elif kind == "lock_off":
            req = ("POST", "/guard/lock", {"enabled": False})
        elif kind == "strength":
            req = ("POST", "/guard/lock", {"strength": round(rng.uniform(0, 2), 3)})
        elif kind == "adapter_lock":
            req = ("POST", "/guard/lock", {"adapter": "good", "enabled": rng.random() < 0.5})
        elif kind == "policy":
            req = ("POST", "/guard/policy", {"vet_policy": rng.choice(["reject", "lock", "warn"])})
        elif kind == "probe":
            req = ("POST", "/guard/probe", {"adapter": rng.choice(targets)})
        elif kind == "load_good":
            req = ("POST", "/v1/load_lora_adapter", {"lora_name": "good2", "lora_path": str(good2)})
        elif kind == "unload_good":
            req = ("POST", "/v1/unload_lora_adapter", {"lora_name": "good2"})
        elif kind == "bad_adapter":
            which = next(bad_cycle)  # every kind in turn
            kind = f"bad_adapter:{which}"
            req = ("POST", "/v1/load_lora_adapter", {"lora_name": f"bad-{which}", "lora_path": str(bad[which])})
        elif kind == "bad_lock":
            which = rng.choice(["foreign_lock", "not_a_lock"])
            kind = f"bad_lock:{which}"
            req = ("POST", "/guard/lock", {"file": str(bad[which])})
        else:
            req = ("GET", "/guard/status", None)
        try:
            status, body = http(req[0], srv.url + req[1], req[2], timeout=300)
        except Exception as e:
            status, body = -1, repr(e)
        actions[kind] += 1
        stats["admin_actions"] += 1
        if status == -1 or status >= 500:
            stats["admin_failed"] += 1
            failures.append(f"admin {kind}: {status} {str(body)[:200]}")
        elif status >= 400:
            refused[kind] += 1  # bad input, refused with a message: the expected answer
            if kind.startswith("bad_") and status not in (400, 403, 404, 409):
                failures.append(f"admin {kind}: unexpected {status}")

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    engine_restarts = 0
    try:
        while time.monotonic() - t0 < args.seconds:
            admin_once()
            time.sleep(args.interval)
            alive = srv.proc is not None and srv.proc.poll() is None
            try:
                healthy = alive and http("GET", srv.url + "/health", timeout=30)[0] == 200
            except Exception:
                healthy = False
            if not healthy:
                engine_restarts += 1
                failures.append("server died or stopped answering /health")
                break
            print(f"[{time.monotonic() - t0:6.0f}s] requests {stats['requests']} failed {stats['failed']} "
                  f"admin {stats['admin_actions']} admin_failed {stats['admin_failed']}", flush=True)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
        status = http("GET", srv.url + "/guard/status")[1] if engine_restarts == 0 else {}
        srv.stop()
    worker = (status.get("worker_state") or [{}])[0] if isinstance(status, dict) else {}
    result = {
        "seconds": round(time.monotonic() - t0, 1), "clients": args.clients, "requests": stats["requests"],
        "failed": stats["failed"], "admin_actions": stats["admin_actions"], "admin_failed": stats["admin_failed"],
        "engine_restarts": engine_restarts, "dtype": args.dtype,
        "mode": worker.get("compiled") and "compiled" or "eager", "lora": lora,
        "actions": dict(actions), "refused_with_4xx": dict(refused),
        "worker_step_errors": worker.get("step_errors"), "worker_rpc_errors": worker.get("rpc_errors"),
        "guard_errors": status.get("errors") if isinstance(status, dict) else None,
        "failures": failures[:20], "model": model.name,
    }
    name = "serve_chaos" if args.dtype == "bfloat16" and lora else f"serve_chaos-{args.dtype}{'' if lora else '-nolora'}"
    write_result(name, result)


if __name__ == "__main__":
    main()
