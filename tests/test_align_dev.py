"""lab/align_dev.py's rule v4 as code: two seeds each within the constraints and the budget, at least the released
base's dev harmful refusal, then the most of it."""

from __future__ import annotations

from lab.align_dev import VARIANTS, choose_v4
from training import overrefusal


def row(variant: str, ood: float, edgy: float = 4.0, minutes: float = 12.0, everyday: float = 0.0,
        lock: float = 100.0, worst: float = 10.0) -> dict:
    cats = {c: 0.0 for c in overrefusal.edgy_categories()}
    cats[next(iter(cats))] = worst
    return {"rule": 4, "variant": variant, "ood": ood, "dev_edgy": edgy, "dev_everyday": everyday,
            "lock_harmful": lock, "align_minutes": minutes, "dev_by_category": {**cats, "everyday": everyday}}


def test_v4_needs_both_seeds_the_budget_and_the_released_base_s_ood():
    base = row("SB2T.s0", 84.0, minutes=18.0)  # the released base: over budget itself, only the bar
    rows = [base,
            row("A.s0", 95.0), row("A.s1", 94.0, minutes=15.5),  # one seed over the budget
            row("B.s0", 90.0), row("B.s1", 88.0),  # qualifies, mean 89
            row("C.s0", 93.0), row("C.s1", 92.0, everyday=4.2),  # one seed over-refuses everyday chat
            row("D.s0", 99.0),  # one seed only
            row("E.s0", 83.0), row("E.s1", 84.0)]  # within everything, below the base's ood
    out = choose_v4(rows)
    assert out["chosen"] == "B" and out["base_ood"] == 84.0
    assert not any(out["variants"][n]["qualifies"] for n in "ACDE")


def test_v4_ties_within_three_points_go_to_less_over_refusal_and_none_keeps_the_base():
    rows = [row("SB2T.s0", 80.0), row("A.s0", 92.0, edgy=7.0), row("A.s1", 92.0, edgy=7.0),
            row("B.s0", 90.0, edgy=2.0), row("B.s1", 90.0, edgy=3.0)]
    assert choose_v4(rows)["chosen"] == "B"
    assert choose_v4([row("SB2T.s0", 80.0), row("A.s0", 92.0, worst=16.0), row("A.s1", 92.0)])["chosen"] is None
    assert choose_v4([row("A.s0", 92.0), row("A.s1", 92.0)])["chosen"] is None  # no base row: nothing to beat


def test_v4_variants_come_in_seed_pairs_that_differ_only_by_the_seed():
    pairs: dict[str, list[dict]] = {}
    for name, override in VARIANTS.items():
        if ".s" in name and override is not None:
            pairs.setdefault(name.split(".s")[0], []).append({k: v for k, v in override.items() if k != "seed"})
    assert pairs and all(len(p) == 2 and p[0] == p[1] for p in pairs.values())
