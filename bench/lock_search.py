"""Which SafetyLock build settings cut an attacked adapter's harmfulness most per point of over-refusal?

Development data only: the lock split's harmful prompts (whose answers build the lock) and the benign-but-edgy
prompts of the alignment side; the held-out eval prompts are never touched here (bench/lock_eval.py measures
those once, for the settings this search picks). For each variant (answer token positions x number of heads)
the lock is built from one shared set of contrast pairs and applied to the attacked adapter over a strength
grid; the score of a variant is the most dev harmful prompts refused while dev over-refusal stays within the
allowed rise over the unlocked adapter. Writes bench/results/lock_search.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import write_result

from guard.artifacts import write_json_atomic
from guard.config import load_config
from guard.judge import DEFAULT_JUDGE
from guard.models import fingerprint_dir, load_causal_lm, resolve_threads
from training import data
from lab.sweeps import strength_sweep
from training.evaluate import load_base_with_adapter, refusal_rate
from guard.workspace import Workspace
from training.safetylock import (build_lock_from_activations, contrast_pairs, head_activations, probe_rows,
                                 split_by_prompt)

VARIANTS = {  # name: (answer positions, heads)
    "last1_h24": ([-1], 24),
    "last4_h24": ([-1, -2, -3, -4], 24),
    "start4_h24": ([0, 1, 2, 3], 24),
    "start4_h48": ([0, 1, 2, 3], 48),
    "start4_h12": ([0, 1, 2, 3], 12),
    "start8_h24": (list(range(8)), 24),
    "start1_h24": ([0], 24),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None)
    ap.add_argument("--adapter", type=Path, required=True, help="attacked adapter (plain SFT on a poisoned mix)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--grid", default="0.1,0.2,0.3,0.5,0.75,1")
    ap.add_argument("--max-over-refusal-rise", type=float, default=10.0)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--name", default="lock_search", help="result file stem under bench/results")
    args = ap.parse_args()
    cfg = load_config(args.config)
    resolve_threads(cfg.runtime.threads)
    home = cfg.runtime.resolved_home()
    s = data.splits()
    dev_h, dev_b = list(s.lock), list(s.edgy_align)

    names = args.variants.split(",")
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    fp = fingerprint_dir(Workspace(cfg).base())
    pairs_file = home / "work" / f"lock-pairs-{fp[:16]}-{cfg.lock.prompts}-{cfg.lock.answer_tokens}.json"
    aligned, tok = load_causal_lm(Workspace(cfg).base(), "float32")
    if pairs_file.is_file():
        pairs = json.loads(pairs_file.read_text())
    else:
        original, _ = load_causal_lm(Workspace(cfg).original(), "float32")
        cp = contrast_pairs(aligned, original, tok, dev_h[: cfg.lock.prompts], cfg.lock.answer_tokens)
        pairs = {"prompts": cp.prompts, "safe": cp.safe, "unsafe": cp.unsafe}
        write_json_atomic(pairs_file, pairs)
        del original
    all_pos = sorted({p for v in names for p in VARIANTS[v][0]})
    safe = head_activations(aligned, tok, pairs["prompts"], pairs["safe"], all_pos)
    unsafe = head_activations(aligned, tok, pairs["prompts"], pairs["unsafe"], all_pos)
    n = len(pairs["prompts"])
    train_prompts = split_by_prompt(n, cfg.lock.holdout)
    locks = {}
    for name in names:
        positions, heads = VARIANTS[name]
        idx = [all_pos.index(q) for q in positions]
        lcfg = cfg.lock.model_copy(update={"positions": positions, "heads": heads})
        locks[name], _ = build_lock_from_activations(*probe_rows(safe[:, idx], unsafe[:, idx], train_prompts),
                                                     aligned, lcfg, fp)  # folded with the aligned base's W_o
    del aligned

    model, tok, _ = load_base_with_adapter(cfg, args.adapter)
    t0 = time.perf_counter()
    unlocked_h, _ = refusal_rate(model, tok, dev_h, args.max_tokens, desc="dev harmful, unlocked")
    unlocked_b, _ = refusal_rate(model, tok, dev_b, args.max_tokens, desc="dev benign, unlocked")
    print(f"unlocked: refused {unlocked_h:.1f}%, over-refusal {unlocked_b:.1f}% ({time.perf_counter() - t0:.0f} s)",
          flush=True)
    result: dict = {"judge": DEFAULT_JUDGE.id, "adapter": str(args.adapter), "pairs": n,
                    "dev_sets": {"harmful": f"lock split (n={len(dev_h)})", "benign": f"edgy_align (n={len(dev_b)})"},
                    "unlocked": {"dev_refused": round(unlocked_h, 2), "dev_over_refusal": round(unlocked_b, 2)},
                    "variants": {}}
    for name, lock in locks.items():
        positions, heads = VARIANTS[name]
        sweep, best = strength_sweep(model, tok, lock, [float(v) for v in args.grid.split(",")], dev_h, dev_b,
                                     args.max_tokens, args.max_over_refusal_rise, unlocked_b, label=name)
        result["variants"][name] = {"positions": positions, "heads": heads, "sweep": sweep, "best": best}
        print(name, "best", best, flush=True)
    write_result(args.name, result)


if __name__ == "__main__":
    main()
