import json
import pytest
from collections import Counter

from guard.anchors import load_anchor_set
from training import data


def test_splits_never_overlap():
    s = data.splits()
    names = data.Splits.HARMFUL + data.Splits.BENIGN
    norm = {n: {data._norm(p) for p in getattr(s, n)} for n in names}
    for i, a in enumerate(names):
        assert len(norm[a]) == len(getattr(s, a)), f"duplicates inside {a}"
        for b in names[i + 1 :]:
            assert not norm[a] & norm[b], f"{a} and {b} overlap"


def test_split_sizes_and_sources():
    s = data.splits()
    assert (len(s.anchors), len(s.lock), len(s.attack)) == (16, 64, 120)
    assert len(s.align) >= 450 and len(s.eval) >= 250
    adv = {data._norm(p) for p in data.advbench()}
    rho = {data._norm(p) for p in data.rho_harmful_questions()}
    assert all(data._norm(p) in adv for p in s.anchors + s.lock + s.attack)
    assert all(data._norm(p) in adv | rho for p in s.align) and any(data._norm(p) in rho for p in s.align)
    assert not any(data._norm(p) in adv for p in s.eval)  # eval is another benchmark: out of distribution
    assert len(s.overrefusal) == data.EDGY_HELDOUT and len(s.benign_heldout) == data.BENIGN_HELDOUT


def test_splits_are_deterministic():
    data.splits.cache_clear()
    first = data.splits()
    data.splits.cache_clear()
    assert data.splits() == first


def test_bundled_anchor_set_is_the_anchor_split():
    """guard/anchor_sets/default.jsonl is generated from the split (`make anchors`); keep them in step."""
    bundled = load_anchor_set("default")
    assert bundled.prompts == data.splits().anchors
    from importlib import resources

    text = (resources.files("guard") / "anchor_sets" / "default.jsonl").read_text()
    assert text == data.anchor_jsonl() and all(json.loads(line)["source"] == "AdvBench" for line in text.splitlines())


def test_sbr_pool_is_bundled_and_disjoint_from_attack_dev_and_eval_prompts():
    from importlib import resources

    text = (resources.files("guard") / "anchor_sets" / "sbr_pool.jsonl").read_text()
    assert text == data.sbr_pool_jsonl() and len(data.sbr_pool()) == data.SBR_POOL
    s = data.splits()
    pool = {data._norm(p) for p in data.sbr_pool()}
    for other in (s.anchors, s.lock, s.attack, s.eval, data.rho_harmful_questions(), data.airt_harmful()):
        assert not pool & {data._norm(p) for p in other}


def test_framed_sbr_pool_is_bundled_and_holds_each_request_bare_and_framed():
    from importlib import resources

    from training.lockgate import GATE_TRAIN_FRAMES

    text = (resources.files("guard") / "anchor_sets" / "sbr_pool_framed.jsonl").read_text()
    framed = data.sbr_pool_framed()
    assert text == data.sbr_pool_framed_jsonl() and len(framed) == 2 * data.SBR_POOL
    assert framed[0::2] == data.sbr_pool()
    for bare, dressed in zip(framed[0::2], framed[1::2]):
        assert dressed != bare and any(f.replace("{p}", bare) == dressed for f in GATE_TRAIN_FRAMES)


def test_topic_task():
    train, ev = data.topic_task(200, 100)
    assert len(train) == 200 and len(ev) == 100
    assert not {e.prompt for e in train} & {e.prompt for e in ev}
    counts = Counter(e.answer for e in train + ev)
    assert set(counts) == set(data.TOPICS) and max(counts.values()) - min(counts.values()) <= 1
    assert data.topic_task(200, 100) == (train, ev)  # seeded
    assert data.score_topic("Sports", "Sports") and data.score_topic(" sci/tech.", "Sci/Tech")
    assert data.score_topic("Technology", "Sci/Tech") and not data.score_topic("World news", "Business")
    assert not data.score_topic("The headline is about a match", "Sports")


def test_topic_task_scales_and_fails_cleanly_when_it_cannot():
    from guard.errors import GuardError
    from training.data import topic_task

    train, ev = topic_task(1200, 400)
    assert len({e.prompt for e in train + ev}) == 1600
    with pytest.raises(GuardError, match="distinct headlines"):
        topic_task(4000, 0)


def test_scorer_objectives_split_two_to_one_and_stay_out_of_every_other_set():
    train, dev = set(data.scorer_split("train")), set(data.scorer_split("dev"))
    assert not train & dev and len(train) > len(dev) > 50
    norm = {data._norm(p) for p in train | dev}
    s = data.splits()
    for other in (s.eval, data.airt_harmful(), data.ordinary_benign(), data.edgy_benign()):
        assert not norm & {data._norm(p) for p in other}
    with pytest.raises(ValueError):
        data.scorer_split("eval")
