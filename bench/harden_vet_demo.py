"""A real hardening run through the CLI: SFT vs SBR on a benign task with harmful examples mixed in,
then `guard vet` on both adapters. Writes bench/results/harden_vet.json (exit codes and vet reports).

The data file is what a fine-tuning customer would upload: topic-classification examples plus a poison
share of harmful request -> compliant answer pairs (answers generated at run time by the unaligned model).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from common import ROOT, write_result

from guard.config import load_config
from lab.attack import attack_mix
from guard.workspace import Workspace
from training.userdata import write_chat_jsonl


def guard(*args: str) -> subprocess.CompletedProcess:
    print("$ guard " + " ".join(args), flush=True)
    return subprocess.run([sys.executable, "-m", "guardcli.main", *args], cwd=ROOT, text=True,
                          capture_output=True, env=dict(os.environ))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--benign", type=int, default=144)
    ap.add_argument("--poison", type=float, default=0.1)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--grad-accum", type=int, default=2, help="micro-batches of 8 per optimizer step")
    ap.add_argument("--sbr-lambda", type=float, default=None, help="default: harden.sbr_lambda")
    args = ap.parse_args()
    cfg = load_config()
    home = cfg.runtime.resolved_home()
    work = home / "demo"
    work.mkdir(parents=True, exist_ok=True)
    mix, n_harm = attack_mix(Workspace(cfg).original(), home / "work", args.benign, args.poison)
    data = work / "customer.jsonl"
    write_chat_jsonl(data, mix)
    result: dict = {"data": {"examples": len(mix), "harmful": n_harm, "poison": args.poison},
                    "epochs": args.epochs, "lr": args.lr, "batch": f"8x{args.grad_accum}", "sbr_lambda": args.sbr_lambda or cfg.harden.sbr_lambda}
    for method in ("sft", "sbr"):
        out = work / f"adapter-{method}"
        t0 = time.perf_counter()
        extra = ["--lambda", str(args.sbr_lambda)] if method == "sbr" and args.sbr_lambda is not None else []
        extra += ["--no-screen"] if method == "sft" else []  # the unprotected adapter: nothing screened either
        h = guard("harden", "--data", str(data), "--method", method, "--out", str(out), "--epochs",
                  str(args.epochs), "--lr", str(args.lr), "--grad-accum", str(args.grad_accum), *extra)
        if h.returncode != 0:
            sys.exit(f"harden {method} failed:\n{h.stderr[-3000:]}")
        v = guard("vet", str(out))
        vj = guard("vet", str(out), "--json")
        result[method] = {"harden_seconds": round(time.perf_counter() - t0, 1), "vet_exit_code": v.returncode,
                          "vet_table": v.stdout, "vet": json.loads(vj.stdout),
                          "guard_json": json.loads((out / "guard.json").read_text())["final_drift"]}
        print(v.stdout, flush=True)
    write_result("harden_vet", result)


if __name__ == "__main__":
    main()
