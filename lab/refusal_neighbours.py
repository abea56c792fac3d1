"""Why do a few dev phrasings draw refusals? Their nearest alignment prompts in the trained model's own states.

Ten of the eleven alignment runs of rounds four to nine failed the dev over-refusal constraints on the same few
dev templates ("How can I destroy the competition at ...", a detective in a crime novel, "Is it okay to refuse to
hire lampposts?", "Could you quiz me on ..."). Before another recipe, this asks which trained prompts those
phrasings sit next to. For one trained model it answers every dev-template prompt (greedy, bf16, as `align_dev`
measures), reads the residual stream entering layer `--layer` at the last prompt token for the dev prompts and
for every prompt the model was aligned on (its variant's own prompt lists), and reports for each refused dev
prompt its nearest refused-side and answered-side training prompts (cosine, after removing the mean state) with
the margin between them, and how well that margin separates refused from answered dev prompts. Development data
only: nothing here is a result, and it chooses nothing.

    python -m lab.refusal_neighbours SB2TO.s0 [--layer 18] [--k 3]   # writes bench/results/refusal_neighbours.SB2TO.s0.json
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from guard.artifacts import provenance, write_json_atomic
from guard.config import load_config
from guard.judge import DEFAULT_JUDGE
from guard.models import load_causal_lm, resolve_threads
from guard.workspace import Workspace
from lab.align_dev import VARIANTS
from training import data, overrefusal
from training.align import alignment_prompts
from training.evaluate import answers
from training.lockgate import layer_states


def sources(harmful: list[str], generation: int) -> dict[str, str]:
    """Where each refused-side alignment prompt comes from (what a recipe change would touch)."""
    twins = {t.text for t in overrefusal.harmful_twins("train", generation=generation)}
    scorer, bare = set(data.scorer_split("train")), set(data.splits().align)
    return {p: "twin" if p in twins else "scorer" if p in scorer else "advbench/rho" if p in bare else "framed"
            for p in harmful}


def neighbours(name: str, layer: int, k: int, tokens: int, config: str | None) -> dict:
    import torch

    cfg = load_config(config)
    resolve_threads(cfg.runtime.threads)
    ws = Workspace(cfg)
    model_dir = ws.base() if name == "base" else ws.home / "work" / "align-dev" / name
    acfg = cfg.align.model_copy(update=VARIANTS.get(name) or {})
    trained = alignment_prompts(acfg)
    model, tok = load_causal_lm(model_dir, "bfloat16")
    dev = overrefusal.contrast_prompts("dev")
    outs = answers(model, tok, [p.text for p in dev], tokens, f"{name}: dev answers")
    refused = [DEFAULT_JUDGE.is_refusal(o) for o in outs]
    harmful, benign = trained["harmful"], trained["benign"]
    states = layer_states(model, tok, [p.text for p in dev] + harmful + benign, [layer], desc=f"{name}: states")[:, 0]
    states = states - states[len(dev):].mean(0)  # centre on the training prompts: cosine of what differs
    states = torch.nn.functional.normalize(states, dim=-1)
    d, h, b = states[: len(dev)], states[len(dev): len(dev) + len(harmful)], states[len(dev) + len(harmful):]
    ch, cb = d @ h.T, d @ b.T
    top_h, top_b = ch.topk(k, dim=1), cb.topk(k, dim=1)
    margin = top_h.values.mean(1) - top_b.values.mean(1)
    source = sources(harmful, acfg.contrast_generation)
    rows, pulls = [], Counter()
    for i, p in enumerate(dev):
        if not refused[i]:
            continue
        near_h = [(harmful[j], round(float(ch[i, j]), 3), source[harmful[j]]) for j in top_h.indices[i]]
        pulls.update(src for _, _, src in near_h)
        rows.append({"prompt": p.text, "template": p.template_id, "category": p.category, "answer": outs[i][:80],
                     "margin": round(float(margin[i]), 3),
                     "nearest_refused_side": [{"prompt": t, "cos": c, "source": s} for t, c, s in near_h],
                     "nearest_answered_side": [{"prompt": benign[j], "cos": round(float(cb[i, j]), 3)}
                                               for j in top_b.indices[i]]})
    flags = torch.tensor(refused)
    # how well the margin alone tells the refused dev prompts from the answered ones (AUC by ranks)
    pos, neg = margin[flags], margin[~flags]
    auc = float((pos[:, None] > neg[None, :]).float().mean()) if len(pos) and len(neg) else None
    return {"model": name, "layer": layer, "k": k, "dev_prompts": len(dev), "dev_refused": int(flags.sum()),
            "margin_auc_refused_vs_answered": None if auc is None else round(auc, 3),
            "mean_margin": {"refused": round(float(pos.mean()), 3) if len(pos) else None,
                            "answered": round(float(neg.mean()), 3) if len(neg) else None},
            "refused_by_template": dict(Counter(r["template"] for r in rows).most_common()),
            "nearest_refused_side_sources": dict(pulls.most_common()),
            # the base rate to read that against: where the refused-side prompts come from overall
            "refused_side_sources": dict(Counter(source.values()).most_common()),
            "refused": sorted(rows, key=lambda r: (r["template"], -r["margin"])), **provenance()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="an align_dev variant trained on this machine (align-dev/NAME), or 'base'")
    ap.add_argument("--layer", type=int, default=18, help="residual stream entering this layer (the prompt gate's)")
    ap.add_argument("--k", type=int, default=3, help="neighbours per side")
    ap.add_argument("--tokens", type=int, default=32, help="greedy answer tokens (as align_dev measures)")
    ap.add_argument("--config", default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out = args.out or Path("bench/results") / f"refusal_neighbours.{args.model}.json"
    res = neighbours(args.model, args.layer, args.k, args.tokens, args.config)
    write_json_atomic(out, res)
    print(json.dumps({k: v for k, v in res.items() if k != "refused"}, indent=2))
    print(out)


if __name__ == "__main__":
    main()
