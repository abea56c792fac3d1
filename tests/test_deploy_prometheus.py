"""deploy/: alert rules under promtool, the dashboard and manifests parse, and a live Prometheus scraping a
guarded server fires the drift alert once a harmful adapter is loaded under vet policy `warn`.

The "harmful" adapter is a random LoRA with large B (anchor drift ~0.7, far above the 0.2 threshold); no
harmful data is involved. For the live test the rules' `for:` durations are shortened to seconds (the
expressions and thresholds are the shipped ones) and Prometheus scrapes and evaluates every second.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lab.devtools import GuardServer, free_port, http, random_lock, random_lora

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def tool(name: str) -> str:
    """The tool's path. Skipped where it is missing, except under CI, where `make test`'s setup installs it:
    there a missing tool is a broken setup, and a skip would hide it."""
    path = shutil.which(name)
    if path is None:
        msg = f"{name} not installed (Debian package prometheus; scripts/setup.sh installs it as root)"
        if os.environ.get("CI"):
            pytest.fail(f"CI: {msg}")
        pytest.skip(msg)
    return path


def test_alert_rules_check_and_unit_tests_pass():
    promtool = tool("promtool")
    rules = DEPLOY / "prometheus"
    check = subprocess.run([promtool, "check", "rules", "alerts.yml"], cwd=rules, capture_output=True, text=True)
    assert check.returncode == 0 and "6 rules found" in check.stdout, check.stdout + check.stderr
    test = subprocess.run([promtool, "test", "rules", "alerts_test.yml"], cwd=rules, capture_output=True, text=True)
    assert test.returncode == 0 and "SUCCESS" in test.stdout, test.stdout + test.stderr
    tested = set(re.findall(r"alertname: (\w+)", (rules / "alerts_test.yml").read_text()))
    shipped = {r["alert"] for g in yaml.safe_load((rules / "alerts.yml").read_text())["groups"] for r in g["rules"]}
    assert shipped == tested == {"SafetyGuardAdapterUnsafe", "SafetyGuardAdapterSuspect", "SafetyGuardProbeStale",
                                 "SafetyGuardProbeFailing", "SafetyGuardFlaggedAnswered", "SafetyGuardProbeDutyCycleHigh"}


def test_scrape_config_checks():
    r = subprocess.run([tool("promtool"), "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dashboard_and_manifests_parse_and_use_the_guard_series():
    dash = json.loads((DEPLOY / "grafana" / "dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p.get("targets", []))
    for series in ("safety_guard_anchor_drift", "safety_guard_anchor_refusal_ratio", "safety_guard_lock_enabled",
                   "safety_guard_probe_duration_seconds_bucket", "safety_guard_adapter_rejections_total", "vllm:",
                   "safety_guard_requests_flagged_total", "safety_guard_flagged_answered_total",
                   "safety_guard_adapter_verdict"):
        assert series in exprs, series
    docs = [d for f in sorted((DEPLOY / "k8s").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "ConfigMap"} <= kinds
    from guard.config import GuardConfig

    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    GuardConfig.model_validate(yaml.safe_load(cm["data"]["guard.yaml"]))  # the example config loads as shipped
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:2] == ["guard", "serve"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    import tomllib

    packages = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    for name in ("Dockerfile.cpu", "Dockerfile.gpu"):
        text = (DEPLOY / "docker" / name).read_text()
        # one source of install truth: the images run the setup script, and copy every installed package
        assert "scripts/setup.sh --system" in text and "ENTRYPOINT" in text
        copied = set(re.findall(r"^COPY (\w+) ", text, re.M))
        assert {p.rstrip("*") for p in packages["include"]} <= copied, name


@pytest.mark.integration
def test_live_prometheus_fires_drift_alert_for_harmful_adapter_under_warn(default_model_dir, tmp_path):
    """One adapter, three readers, one verdict: `guard vet`, the vetting gate at load, and /metrics (whose verdict
    series the shipped alert fires on, in a real Prometheus)."""
    prometheus = tool("prometheus")
    m = default_model_dir
    (tmp_path / "guard.yaml").write_text(
        f"model:\n  base: '{m}'\nruntime:\n  home: '{tmp_path / 'home'}'\n"
        "anchors:\n  k: 4\ndrift:\n  probe_tokens: 4\n  min_refusal_ratio: 0.0\n"
        "serve:\n  vet_policy: warn\n  probe_interval_seconds: 20\n")
    lock = random_lock(m, tmp_path / "lock.safetensors")
    harmful = random_lora(m, tmp_path / "harmful", b_std=0.5, seed=3)
    rules = (DEPLOY / "prometheus" / "alerts.yml").read_text()
    (tmp_path / "alerts.yml").write_text(re.sub(r"for: \d+m", "for: 2s", rules))
    port, prom_port = free_port(), free_port()
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(tmp_path / "alerts.yml")],
        "scrape_configs": [{"job_name": "safety-guard", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}],
    }))
    srv = GuardServer.guarded(port, "--config", str(tmp_path / "guard.yaml"), "--model", str(m), "--lock", str(lock),
                              log_path=tmp_path / "server.log")
    prom = None
    try:
        srv.start()
        prom = subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
                                stdout=subprocess.DEVNULL, stderr=(tmp_path / "prometheus.log").open("w"),
                                start_new_session=True)
        api = f"http://127.0.0.1:{prom_port}/api/v1"
        status, body = http("POST", srv.url + "/v1/load_lora_adapter",
                            {"lora_name": "harmful", "lora_path": str(harmful)})
        assert status == 200 and "safety-guard: fail" in body, body  # warn: served, flagged
        deadline, firing = time.monotonic() + 90, []
        while time.monotonic() < deadline:
            try:
                alerts = http("GET", api + "/alerts", timeout=5)[1]["data"]["alerts"]
            except (OSError, KeyError, TypeError):
                alerts = []
            firing = [a for a in alerts if a["labels"]["alertname"] == "SafetyGuardAdapterUnsafe"
                      and a["state"] == "firing"]
            if firing:
                break
            time.sleep(1)
        assert firing, f"verdict alert never fired; alerts: {alerts}"
        assert firing[0]["labels"]["adapter"] == "harmful" and float(firing[0]["value"]) == 2.0
        vet = subprocess.run([sys.executable, "-m", "guardcli.main", "vet", "--json", "--config",
                              str(tmp_path / "guard.yaml"), str(harmful)], capture_output=True, text=True)
        assert vet.returncode == 3 and json.loads(vet.stdout)["status"] == "fail", vet.stdout + vet.stderr
        up = http("GET", api + "/query?query=up", timeout=5)[1]["data"]["result"]
        assert up and up[0]["value"][1] == "1"
        assert not any(a["labels"].get("adapter") == srv_name(m) for a in firing)
    finally:
        if prom is not None:
            prom.send_signal(signal.SIGTERM)
            try:
                prom.wait(timeout=20)
            except subprocess.TimeoutExpired:
                prom.kill()
        srv.stop()


def srv_name(model_dir: Path) -> str:
    return model_dir.name
