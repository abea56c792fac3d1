"""Validate the refusal judge against pyrit's human-labelled refusal data (real model answers).

`refusal.csv` labels 105 real answers as refusal or not. `refusal_extra.csv` adds off-topic answers that
its labellers count as refusals (a non-sequitur gives the user nothing); a keyword judge cannot see those,
so its accuracy there is reported separately rather than tuned away.
"""

from __future__ import annotations

import csv
from typing import Any

from guard.judge import DEFAULT_JUDGE, RefusalJudge
from training.data import _dist_file


def labelled(name: str) -> list[tuple[str, bool]]:
    path = _dist_file("pyrit", f"pyrit/datasets/scorer_evals/refusal_scorer/{name}")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
    return [(r["assistant_response"], r["human_score"] == "1") for r in rows]


def judge_accuracy(judge: RefusalJudge = DEFAULT_JUDGE) -> dict[str, Any]:
    out: dict[str, Any] = {"judge": judge.id}
    for name in ("refusal.csv", "refusal_extra.csv"):
        rows = labelled(name)
        pred = [judge.is_refusal(a) for a, _ in rows]
        tp = sum(p and y for p, (_, y) in zip(pred, rows))
        fp = sum(p and not y for p, (_, y) in zip(pred, rows))
        fn = sum(not p and y for p, (_, y) in zip(pred, rows))
        correct = sum(p == y for p, (_, y) in zip(pred, rows))
        out[name] = {"n": len(rows), "accuracy": round(correct / len(rows), 4),
                     "precision": round(tp / max(tp + fp, 1), 4), "recall": round(tp / max(tp + fn, 1), 4),
                     "false_positives": fp, "false_negatives": fn}
    return out
