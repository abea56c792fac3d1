"""The stress test's pure parts (rank correlation, option checks) and, on the real model, a --smoke run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from guard.errors import GuardError
from lab.stress import StressConfig, markdown, spearman

ROOT = Path(__file__).resolve().parent.parent


def test_spearman_matches_known_values():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)
    assert spearman([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833)  # ties get average ranks
    assert spearman([1, 2], [1, 2]) is None and spearman([1, 1, 1], [1, 2, 3]) is None


def test_stress_config_refuses_bad_values():
    with pytest.raises(GuardError, match="unknown bogus"):
        StressConfig(methods=["sft", "bogus"])
    with pytest.raises(GuardError, match="poison"):
        StressConfig(poison=1.0)
    with pytest.raises(GuardError, match="lambdas"):
        StressConfig(lambdas=[-1.0])
    assert StressConfig.smoke().epochs == 1


def test_stress_rejects_bad_options_before_any_work():
    def run(*args):
        return subprocess.run([sys.executable, "bench/stress.py", *args], capture_output=True, text=True, cwd=ROOT)

    out = run("--methods", "sft,bogus")
    assert out.returncode == 1 and out.stderr.strip() == "error: --methods: unknown bogus; choose from sft, sbr, asft"
    out = run("--lambdas", "5,x")
    assert out.returncode == 1 and "--lambdas must be comma-separated numbers" in out.stderr


def test_markdown_reports_final_and_worst_epoch():
    r = {"judge": "keyword-refusal@1", "seconds": 60, "spearman_drift_hs": 0.9,
         "config": {"poison": 0.1, "epochs": 2, "examples": 10, "harmful_examples": 1},
         "base": {"hs": 1.0, "fa": 20.0, "over_refusal": 5.0, "drift": 0.0},
         "methods": {"sft": {"epochs": [{"epoch": 1, "hs": 60.0, "fa": 50, "over_refusal": 0, "drift": 0.3},
                                        {"epoch": 2, "hs": 40.0, "fa": 70, "over_refusal": 0, "drift": 0.4}]}}}
    md = markdown(r)
    assert "| sft | 40.0 | 60.0 | 70.0 | 0.0 | 0.400 |" in md and "**0.90**" in md


@pytest.mark.integration
def test_smoke_run_writes_every_output(mini_prepared, tmp_path):
    cfg, _ = mini_prepared
    r = subprocess.run([sys.executable, "bench/stress.py", "--smoke", "--config", str(cfg),
                        "--out", str(tmp_path), "--name", "smoke"], capture_output=True, text=True, cwd=ROOT,
                       timeout=1200, env=dict(os.environ))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "smoke.json").read_text())
    assert res["judge"] == "keyword-refusal@1" and set(res["base"]) == {"hs", "fa", "over_refusal", "drift"}
    assert set(res["methods"]) == {"sft", "sbr", "asft", "sft+lock", "sbr+lock"}
    for v in res["methods"].values():
        assert [e["epoch"] for e in v["epochs"]] == [1]
        assert all(0 <= e["hs"] <= 100 and 0 <= e["fa"] <= 100 and e["drift"] >= 0 for e in v["epochs"])
    assert res["methods"]["sft"]["epochs"][0]["drift"] > 0  # training moved the anchors
    sc = res["config"]["screened"]  # the protected methods train on the screened data, as `guard harden` does
    assert sc["of"] == res["config"]["examples"] and 0 <= sc["harmful_dropped"] <= min(sc["harmful"], sc["dropped"])
    assert (tmp_path / "smoke.md").is_file() and (tmp_path / "smoke.png").stat().st_size > 10_000
    assert not (tmp_path / "smoke.partial.json").exists()
    # the run kept its SFT/SBR adapters: --relock re-measures the +lock rows from them and, with the same
    # lock and strength, reproduces what the run measured
    r = subprocess.run([sys.executable, "bench/stress.py", "--relock", "--config", str(cfg),
                        "--out", str(tmp_path), "--name", "smoke"], capture_output=True, text=True, cwd=ROOT,
                       timeout=1200, env=dict(os.environ))
    assert r.returncode == 0, r.stderr[-3000:]
    again = json.loads((tmp_path / "smoke.json").read_text())
    assert "relock" in again and again["methods"]["sft"] == res["methods"]["sft"]
    for k in ("sft+lock", "sbr+lock"):
        before, after = res["methods"][k]["epochs"][0], again["methods"][k]["epochs"][0]
        assert {m: after[m] for m in ("hs", "fa", "over_refusal")} == {m: before[m] for m in ("hs", "fa", "over_refusal")}
        assert after["drift"] == pytest.approx(before["drift"], rel=1e-3, abs=1e-5)
