"""Over-refusal contrast generator: deterministic, split by template (and text), complete, well-formed."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from training import overrefusal as ov
from training.overrefusal import CATEGORIES, SPLITS, ContrastPrompt, contrast_prompts, edgy_categories, harmful_twins


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


def test_categories_and_edgy():
    assert CATEGORIES == ("homonyms", "figurative", "safe_targets", "safe_contexts", "definitions",
                          "nonsense_discrimination", "history", "public_privacy", "everyday")
    assert edgy_categories() == CATEGORIES[:-1]


@pytest.mark.parametrize("split", SPLITS)
def test_deterministic(split):
    assert contrast_prompts(split) == contrast_prompts(split)
    assert contrast_prompts(split, per_category=7, seed=3) == contrast_prompts(split, per_category=7, seed=3)
    assert harmful_twins(split) == harmful_twins(split)
    assert contrast_prompts(split, per_category=7, seed=3) != contrast_prompts(split, per_category=7, seed=4)


@pytest.mark.parametrize(("a", "b"), [("train", "heldout"), ("train", "dev"), ("dev", "heldout")])
def test_splits_disjoint_by_template_and_text(a, b):
    pa, pb = contrast_prompts(a), contrast_prompts(b)
    assert {p.template_id for p in pa}.isdisjoint({p.template_id for p in pb})
    assert {_norm(p.text) for p in pa}.isdisjoint({_norm(p.text) for p in pb})
    assert set(ov.template_ids(a)).isdisjoint(ov.template_ids(b))


def test_dev_templates_mostly_bring_their_own_fillers():
    """Dev prompts stand in for unseen phrasings *and* unseen content: few share a filler with the train split."""
    train_text = " ".join(p.text.lower() for p in contrast_prompts("train"))
    fillers = {v for cat in ov._SPECS.values() for t in cat.templates if t.split == "dev"
               for name in re.findall(r"\{(\w+)\}", t.text) for v in cat.slots[name].for_split("dev")}
    assert len(fillers) >= 100
    assert sum(v.lower() in train_text for v in fillers) <= len(fillers) // 10
    assert len(contrast_prompts("dev")) >= 150


def test_twin_splits_follow_templates():
    tw_train, tw_held = harmful_twins("train"), harmful_twins("heldout")
    assert {p.template_id for p in tw_train} <= set(ov.template_ids("train"))
    assert {p.template_id for p in tw_held} <= set(ov.template_ids("heldout"))
    assert {_norm(p.text) for p in tw_train}.isdisjoint({_norm(p.text) for p in tw_held})


@pytest.mark.parametrize("split", SPLITS)
def test_prompts_well_formed(split):
    prompts = contrast_prompts(split)
    assert all(isinstance(p, ContrastPrompt) and p.split == split for p in prompts)
    assert all(p.category in CATEGORIES and p.template_id.startswith(p.category + "/") for p in prompts)
    assert len({_norm(p.text) for p in prompts}) == len(prompts)  # distinct
    for p in prompts + harmful_twins(split):
        assert "{" not in p.text and "}" not in p.text, p
        assert p.text == p.text.strip() and "  " not in p.text and p.text, p


def test_counts_per_category():
    for cat in CATEGORIES:
        train = contrast_prompts("train", categories=[cat], openers=True)
        held = contrast_prompts("heldout", categories=[cat])
        dev = contrast_prompts("dev", categories=[cat])
        assert len(train) >= 40, (cat, len(train))
        assert len(held) >= 20 and len(dev) >= 20, (cat, len(held), len(dev))
        n_train, n_held = len(ov.template_ids("train", [cat])), len(ov.template_ids("heldout", [cat]))
        assert n_train >= 4 and n_held >= 4 and len(ov.template_ids("dev", [cat])) >= 4, cat
        assert {p.template_id for p in dev} == set(ov.template_ids("dev", [cat]))
        assert n_train + n_held >= (25 if cat == "everyday" else 12), cat
        # every template yields at least one prompt
        assert {p.template_id for p in train} == set(ov.template_ids("train", [cat]))
        assert {p.template_id for p in held} == set(ov.template_ids("heldout", [cat]))


@pytest.mark.parametrize("split", SPLITS)
def test_per_category_sampling(split):
    full = contrast_prompts(split, openers=True)
    size = Counter(p.category for p in full)  # the check split has 12 per category: a sample takes what there is
    for n in (1, 5, 13, 20):
        sample = contrast_prompts(split, per_category=n, seed=1, openers=True)
        counts = Counter(p.category for p in sample)
        assert set(counts) == set(CATEGORIES) and all(c == min(n, size[k]) for k, c in counts.items()), (n, counts)
        assert len({_norm(p.text) for p in sample}) == len(sample)
        assert set(sample) <= set(full)
    # enough per category to cover every template: round-robin uses each one
    sample = contrast_prompts(split, per_category=40, seed=5, openers=True)
    assert {p.template_id for p in sample} == set(ov.template_ids(split))
    # template usage is balanced: a template is used less than the busiest one minus one only once it is exhausted
    size = Counter(p.template_id for p in full)
    for cat in CATEGORIES:
        per_t = Counter(p.template_id for p in sample if p.category == cat)
        top = max(per_t.values())
        assert all(c >= top - 1 or c == size[t] for t, c in per_t.items()), (cat, per_t)
    # asking for more than exists returns all of them, once each
    big = contrast_prompts(split, per_category=10_000, openers=True)
    assert sorted(p.text for p in big) == sorted(p.text for p in full)


def test_categories_filter():
    got = contrast_prompts("train", per_category=3, categories=["history", "homonyms"])
    assert [p.category for p in got] == ["history"] * 3 + ["homonyms"] * 3
    assert contrast_prompts("heldout", categories="everyday") == contrast_prompts("heldout", categories=["everyday"])


@pytest.mark.parametrize("kwargs", [
    {"split": "test"}, {"split": "Train"}, {"split": "train", "categories": ["homonym"]},
    {"split": "train", "categories": ["history", "nope"]}, {"split": "train", "per_category": 0},
    {"split": "train", "per_category": -2},
])
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError, match="unknown split|unknown category|per_category"):
        contrast_prompts(**kwargs)


def test_unknown_split_errors_elsewhere():
    with pytest.raises(ValueError, match="unknown split"):
        harmful_twins("eval")
    with pytest.raises(ValueError, match="unknown split"):
        ov.template_ids("validation")


def test_twins():
    train, held = harmful_twins("train"), harmful_twins("heldout")
    assert len(train) >= 30
    assert held
    benign = {_norm(p.text) for s in SPLITS for p in contrast_prompts(s)}
    for p in train + held:
        assert p.category in edgy_categories()
        assert _norm(p.text) not in benign, p
        assert len(p.text) <= 120, p  # short generic requests only


def test_everyday_has_greetings():
    texts = {p.text for s in SPLITS for p in contrast_prompts(s, categories=["everyday"])}
    assert "Hi!" in texts
    assert any(re.fullmatch(r"(hi|hello|hey)\b.*", t, re.I) for t in contrast_prompts("heldout", categories=["everyday"])
               for t in [t.text])


def test_alignment_trains_on_train_templates_only_and_keeps_its_dev_slice_out():
    from guard.config import AlignConfig
    from training.align import alignment_prompts

    p = alignment_prompts(AlignConfig())
    trained = set(p["harmful"]) | set(p["benign"])
    heldout = {c.text for c in contrast_prompts("heldout")} | {t.text for t in harmful_twins("heldout")}
    assert not trained & heldout  # the over-refusal measure never saw training
    assert p["dev"] and not set(p["dev"]) & trained
    assert not set(p["harmful"]) & set(p["benign"])
    assert {t.text for t in harmful_twins("train", generation=1)} <= set(p["harmful"])
    from training.data import airt_harmful, splits

    assert not set(airt_harmful()) & set(splits().eval)
    assert set(airt_harmful()) <= set(alignment_prompts(AlignConfig(red_team=True))["harmful"])
    small = alignment_prompts(AlignConfig(contrast=9, twins=False, red_team=False, scorer=0))
    assert len(small["benign"]) == AlignConfig().benign + 9 and len(small["harmful"]) == AlignConfig().harmful


def test_every_align_field_reaches_the_base_key():
    """A new AlignConfig field must change the cached base's key: either it is a training hyper-parameter, or it
    selects prompts (and reaches the key through them)."""
    from guard.config import AlignConfig
    from training.align import _TRAINING_FIELDS

    selection = {"harmful", "benign", "contrast", "twins", "red_team", "framed", "framed_pairs", "scorer",
                 "contrast_generation", "contrast_openers"}
    how = {"use_release"}  # where the same base comes from (a bundled release or training here), not which base
    merge = {"delta_scale"}  # how the trained LoRA is merged: the base's key, not the training's (next test)
    assert set(AlignConfig.model_fields) == set(_TRAINING_FIELDS) | selection | how | merge


def test_later_align_fields_change_the_key_only_away_from_their_default():
    """seed and refusal_repeat came after the bundled release: at their defaults the key is the one it was made
    with (test_release checks that key), elsewhere each makes another base."""
    from guard.config import AlignConfig
    from training.align import align_key

    fp = "0" * 64
    later = ({"seed": 1}, {"refusal_repeat": 2}, {"average_epochs": 1}, {"lr_schedule": "linear"},
             {"contrast_openers": True})
    keys = {align_key(fp, AlignConfig(**kw)) for kw in ({}, *later)}
    assert len(keys) == 1 + len(later)
    assert align_key(fp, AlignConfig(seed=0, refusal_repeat=1, average_epochs=0, lr_schedule="constant",
                                     contrast_openers=False)) == align_key(fp, AlignConfig())


def test_the_delta_scale_makes_another_base_from_the_same_training():
    """A base merged at another delta scale is another base (its own key), from the same trained LoRA (the same
    training key, so the release of that training serves it); at 1.0 the two keys are one, as before the field."""
    from guard.config import AlignConfig
    from training.align import align_key, train_key

    fp = "0" * 64
    scaled, one = AlignConfig(delta_scale=1.2), AlignConfig(delta_scale=1.0)
    assert train_key(fp, scaled) == train_key(fp, one) == align_key(fp, one)
    assert len({align_key(fp, scaled), align_key(fp, AlignConfig(delta_scale=0.8)), align_key(fp, one)}) == 3


def test_generations_add_train_templates_without_moving_the_first():
    """Generation 1 is what the shipped base was trained on: newer templates must not change it (nor its samples)."""
    from guard.config import AlignConfig
    from training.align import alignment_prompts

    g1, every = contrast_prompts("train", generation=1), contrast_prompts("train")
    assert set(g1) < set(every)
    assert all(ov._SPECS[p.category].templates[int(p.template_id[-2:])].generation == 1 for p in g1)
    assert contrast_prompts("train", generation=ov.GENERATIONS) == every
    for g in range(1, ov.GENERATIONS):  # each generation only adds
        assert set(contrast_prompts("train", generation=g)) < set(contrast_prompts("train", generation=g + 1))
    for split in ("dev", "check", "heldout"):  # only train templates have later generations
        assert contrast_prompts(split, generation=1) == contrast_prompts(split)
    assert set(harmful_twins("train", generation=1)) < set(harmful_twins("train"))
    sample = contrast_prompts("train", per_category=30, seed=0, generation=1)
    assert set(sample) <= set(g1)
    p1, p2 = (alignment_prompts(AlignConfig(contrast=2000, contrast_generation=g)) for g in (1, 2))
    assert set(p1["benign"]) < set(p2["benign"]) and set(p1["harmful"]) < set(p2["harmful"])
    with pytest.raises(ValueError, match="generation"):
        contrast_prompts("train", generation=ov.GENERATIONS + 1)


def test_framed_pairs_add_as_many_framed_benign_as_framed_harmful_prompts():
    from guard.config import AlignConfig
    from training.align import alignment_prompts, framed

    plain, some = alignment_prompts(AlignConfig()), alignment_prompts(AlignConfig(framed_pairs=30))
    assert len(some["harmful"]) == len(plain["harmful"]) + 30 and len(some["benign"]) == len(plain["benign"]) + 30
    assert framed(plain["harmful"][0]) in some["harmful"]
    every = alignment_prompts(AlignConfig(framed=True, framed_pairs=30))  # framed wins: every harmful prompt
    assert len(every["harmful"]) - len(plain["harmful"]) == AlignConfig().harmful


def test_opener_templates_come_only_when_asked_so_every_earlier_prompt_set_stays():
    for gen in (1, 2, 3, None):
        plain = contrast_prompts("train", generation=gen)
        with_openers = contrast_prompts("train", generation=gen, openers=True)
        extra = [p for p in with_openers if p not in plain]
        assert set(plain) <= set(with_openers) and all(p.category == "everyday" for p in extra)
        assert bool(extra) == (gen is None or gen >= 2)  # the openers extend generation 2
    texts = [p.text for p in contrast_prompts("train", openers=True) if p not in contrast_prompts("train")]
    assert any(t.startswith("Could you ") for t in texts) and any(t.startswith("Would you mind ") for t in texts)
    assert not any(t.startswith(("Could you ", "Would you ")) for t in (p.text for p in contrast_prompts("train")))
