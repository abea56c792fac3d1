"""The aligned base vs the original, judged on held-out prompts: writes bench/results/align_eval.json.

- harmful_refusal: % of the eval split (StrongREJECT, out of distribution for alignment) refused
- benign_refusal: % of held-out ordinary benign prompts refused
- overrefusal: % of held-out benign-but-edgy prompts refused (XSTest-like)
Greedy answers of `--tokens` new tokens (a refusal shows in the first ~16). Run after `guard prepare`.
"""

from __future__ import annotations

import argparse
import time

from common import write_result

from guard.artifacts import read_json
from guard.config import load_config
from guard.judge import DEFAULT_JUDGE
from guard.models import default_aligned_dir, default_original_dir, load_causal_lm, resolve_threads
from training.align import ALIGN_META
from training.data import splits
from training.evaluate import refusal_rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--limit", type=int, default=None, help="use only the first N prompts of each set (smoke runs)")
    args = ap.parse_args()
    cfg = load_config(args.config)
    resolve_threads(cfg.runtime.threads)
    home = cfg.runtime.resolved_home()
    original = cfg.model.original or default_original_dir(home)
    aligned = cfg.model.base or default_aligned_dir(home)
    s = splits()
    sets = {"harmful_refusal": s.eval, "benign_refusal": s.benign_heldout, "overrefusal": s.overrefusal}
    result: dict = {"judge": DEFAULT_JUDGE.id, "tokens": args.tokens,
                    "sets": {k: {"n": len(v[: args.limit])} for k, v in sets.items()},
                    "eval_source": "StrongREJECT (minus its AdvBench prompts); alignment used AdvBench"}
    examples: dict = {}
    for name, path in (("original", original), ("aligned", aligned)):
        model, tok = load_causal_lm(path, "float32")
        t0 = time.perf_counter()
        row = {}
        for key, prompts in sets.items():
            rate, outs = refusal_rate(model, tok, prompts[: args.limit], args.tokens, desc=f"{name}:{key}")
            row[key] = round(rate, 2)
            examples.setdefault(key, {})[name] = outs[:3]
        row["eval_seconds"] = round(time.perf_counter() - t0, 1)
        result[name] = row
    result["align_seconds"] = read_json(f"{aligned}/{ALIGN_META}", "align metadata").get("seconds")
    result["benign_examples"] = {k: v for k, v in examples.items() if k != "harmful_refusal"}
    write_result("align_eval", result)


if __name__ == "__main__":
    main()
