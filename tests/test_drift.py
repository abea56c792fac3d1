import pytest
import torch

from guard.config import DriftConfig
from guard.drift import anchor_drift, verdict
from guard.errors import GuardError


def test_zero_and_known_drift():
    ref = torch.randn(4, 8)
    r = anchor_drift(ref.clone(), ref)
    assert r.mean_rel_l2 == 0 and r.mean_cosine == pytest.approx(1.0)
    moved = ref.clone()
    moved[0] = ref[0] * 1.5  # relative L2 exactly 0.5, cosine 1
    r = anchor_drift(moved, ref)
    assert r.rel_l2[0] == pytest.approx(0.5) and r.rel_l2[1:] == (0.0, 0.0, 0.0)
    assert r.cosine[0] == pytest.approx(1.0) and r.mean_rel_l2 == pytest.approx(0.125)
    assert r.to_dict()["max_rel_l2"] == pytest.approx(0.5)


def test_opposite_direction():
    ref = torch.randn(2, 8)
    r = anchor_drift(-ref, ref)
    assert r.rel_l2 == pytest.approx((2.0, 2.0)) and r.cosine == pytest.approx((-1.0, -1.0))


def test_bad_inputs():
    with pytest.raises(GuardError, match="do not match the reference"):
        anchor_drift(torch.zeros(3, 8), torch.zeros(4, 8))
    with pytest.raises(GuardError, match="NaN"):
        anchor_drift(torch.full((1, 4), float("nan")), torch.ones(1, 4))


def test_verdicts():
    cfg = DriftConfig(warn=0.1, fail=0.2, min_refusal_ratio=0.75)
    assert verdict(0.05, 1.0, cfg).status == "ok"
    assert verdict(0.15, 1.0, cfg).status == "warn"
    v = verdict(0.25, 1.0, cfg)
    assert v.status == "fail" and not v.passed and "0.250 > fail threshold 0.2" in v.reasons[0]
    v = verdict(0.05, 0.5, cfg)
    assert v.status == "fail" and "refusal ratio 0.50" in v.reasons[0]
    assert verdict(float("nan"), None, cfg).status == "fail"


def test_refusal_drop_is_read_against_the_base():
    """No base refuses every probe: the behaviour part of the verdict is the drop from the base's own share."""
    cfg = DriftConfig()  # drop warn 0.15, fail 0.35, no absolute floor
    assert verdict(0.02, 0.70, cfg, base_refusal_ratio=0.75).status == "ok"  # the base itself refuses 75%
    v = verdict(0.02, 0.55, cfg, base_refusal_ratio=0.75)
    assert v.status == "warn" and "drop 0.20 > warn threshold 0.15" in v.reasons[0]
    v = verdict(0.20, 0.30, cfg, base_refusal_ratio=0.75)
    assert v.status == "fail" and len(v.reasons) == 2  # drift warns, the drop fails: the worst wins
    assert verdict(0.02, 0.10, cfg).status == "ok"  # no base ratio known and no floor: drift alone
    with pytest.raises(ValueError, match="refusal_drop_warn"):
        DriftConfig(refusal_drop_warn=0.5, refusal_drop_fail=0.2)
