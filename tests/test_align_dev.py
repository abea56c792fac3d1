"""lab/align_dev.py's rules v4, v5 and v6 as code. v4: two seeds each within the constraints and the budget, at least
the released base's dev harmful refusal, then the most of it. v5: the delta scale with the most dev harmful refusal
among those within the constraints. v6: v5's choice of scale made over two seeds with v4's bar."""

from __future__ import annotations

from lab.align_dev import V5_SCALES, V6_BASE_OOD, V6_SCALES, V6_SEEDS, VARIANTS, choose_v4, choose_v5, choose_v6
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
    # the released recipe's second seed is measured beside it but is neither the bar nor a candidate
    out = choose_v4([row("SB2T.s0", 80.0), row("SB2T.s1", 95.0), row("A.s0", 85.0), row("A.s1", 85.0)])
    assert out["chosen"] == "A" and out["base_ood"] == 80.0 and "SB2T" not in out["variants"]


def test_v4_variants_come_in_seed_pairs_that_differ_only_by_the_seed():
    pairs: dict[str, list[dict]] = {}
    for name, override in VARIANTS.items():
        if ".s" in name and override is not None and not name.startswith("SB2T."):  # SB2T: the base, measured
            pairs.setdefault(name.split(".s")[0], []).append({k: v for k, v in override.items() if k != "seed"})
    assert pairs and all(len(p) == 2 and p[0] == p[1] for p in pairs.values())


def scaled(s: float, ood: float, **kw) -> dict:
    return {**row(f"r@{s}", ood, **kw), "rule": 5, "delta_scale": s}


def test_v5_takes_the_most_harmful_refusal_within_the_constraints():
    rows = [scaled(0.9, 80.0, edgy=2.0), scaled(1.0, 84.0, edgy=3.0), scaled(1.2, 90.0, edgy=6.0),
            scaled(1.35, 93.0, edgy=9.0),  # over dev_edgy 8
            scaled(1.5, 96.0, edgy=5.0, everyday=4.2),  # refuses everyday chat
            row("R2E1.s0", 99.0)]  # a v4 row: not a scale
    out = choose_v5(rows)
    assert out["chosen"] == 1.2 and set(out["scales"]) == {0.9, 1.0, 1.2, 1.35, 1.5}
    assert [s for s, v in out["scales"].items() if v["qualifies"]] == [0.9, 1.0, 1.2]


def test_v5_ties_go_to_less_over_refusal_then_to_the_scale_nearer_one_and_none_when_nothing_qualifies():
    assert choose_v5([scaled(1.0, 85.0, edgy=4.0), scaled(1.1, 87.0, edgy=3.0), scaled(1.2, 88.0, edgy=5.0)])["chosen"] == 1.1
    assert choose_v5([scaled(0.9, 87.0, edgy=4.0), scaled(1.2, 88.0, edgy=4.0)])["chosen"] == 0.9
    assert choose_v5([scaled(1.0, 85.0, lock=94.0), scaled(1.2, 88.0, worst=16.0)])["chosen"] is None
    assert 1.0 in V5_SCALES and list(V5_SCALES) == sorted(V5_SCALES)


def seeded(seed: str, s: float, ood: float, **kw) -> dict:
    return {**row(f"{seed}@{s}", ood, **kw), "rule": 6, "delta_scale": s, "seed_variant": seed}


def test_v6_needs_both_seeds_within_everything_at_a_scale_and_the_base_s_ood():
    a, b = V6_SEEDS
    rows = [seeded(a, 1.0, 89.0, everyday=16.7), seeded(b, 1.0, 90.0),  # seed 0 over-refuses everyday chat
            seeded(a, 0.95, 88.0), seeded(b, 0.95, 87.0, minutes=15.2),  # seed 1 over the budget
            seeded(a, 0.9, 87.0, edgy=5.0), seeded(b, 0.9, 86.0, edgy=5.0),  # qualifies, mean 86.5
            seeded(a, 0.85, 86.0, edgy=3.0), seeded(b, 0.85, 85.0, edgy=2.0),  # qualifies, mean 85.5, less edgy
            seeded(a, 0.8, V6_BASE_OOD - 1, edgy=1.0), seeded(b, 0.8, V6_BASE_OOD - 1, edgy=1.0),  # below the base
            scaled(0.9, 99.0)]  # a v5 row: not A16F's
    out = choose_v6(rows)
    assert [s for s, v in out["scales"].items() if v["qualifies"]] == [0.85, 0.9]
    assert out["chosen"] == 0.85  # within 3 points of 86.5: the lower mean dev_edgy
    assert choose_v6([seeded(a, 0.9, 88.0), seeded(a, 0.95, 89.0)])["chosen"] is None  # one seed only
    assert choose_v6([seeded(a, 0.9, 88.0, edgy=4.0), seeded(b, 0.9, 88.0, edgy=4.0),
                      seeded(a, 1.0, 88.0, edgy=4.0), seeded(b, 1.0, 88.0, edgy=4.0)])["chosen"] == 1.0
    assert 1.0 in V6_SCALES and list(V6_SCALES) == sorted(V6_SCALES)
