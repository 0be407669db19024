#!/usr/bin/env bash
# One prepared run of every CUDA path (issue 22; docs/gpu.md). On a GPU node without internet:
#   scripts/gpu_check.sh [--wheels DIR] [--out DIR]        # install (offline) + every check, <= 8 minutes
#   scripts/gpu_check.sh --cpu --no-install --out DIR      # the CPU variant (tests/test_gpu_check.py runs it)
# Install step: a virtual environment (.gpu-venv) that sees the node's own packages (torch, timm, accelerate, ...),
# the wheels built beforehand on a connected machine (DeepSpeed and what the node lacks), and this checkout
# without dependencies. Then `synqt gpu-check` (launcher/run/gpu_check.py) runs the checks and prints the table.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
WHEELS=wheels
INSTALL=1
ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --wheels) WHEELS="$2"; shift 2 ;;
        --no-install) INSTALL=0; shift ;;
        *) ARGS+=("$1"); shift ;;
    esac
done
if [ "$INSTALL" = 1 ]; then
    export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
    [ -d .gpu-venv ] || "$PYTHON" -m venv --system-site-packages .gpu-venv
    PYTHON=.gpu-venv/bin/python
    if [ -d "$WHEELS" ]; then
        "$PYTHON" -m pip install -q --no-index --find-links "$WHEELS" "$WHEELS"/*.whl
    else
        echo "gpu_check.sh: no wheel folder $WHEELS (docs/gpu.md: build it on a connected machine); installing" \
             "nothing but the project" >&2
    fi
    # the project itself, without dependencies; its build backend (setuptools) comes from the wheels too
    "$PYTHON" -m pip install -q --no-deps --no-index --find-links "$WHEELS" -e .
fi
exec "$PYTHON" -m launcher.cli gpu-check ${ARGS[@]+"${ARGS[@]}"}
