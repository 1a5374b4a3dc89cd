#!/usr/bin/env bash
# The project's GPU check: one command, PASS/FAIL per item with numbers, under 8 minutes on one
# H100/H200 (items and pass marks: tools/gpu_check.py; record the output in README.md).
#
#   bash tools/gpu_check.sh [--items kernel,graphs,...]
#
# PYTHON: an interpreter with CUDA torch 2.11, megatron-core[training] 0.19.2 and, for the TE, FP8 and
# step-time items, Transformer Engine (an NGC PyTorch container has torch and TE; add
# `pip install --no-deps "megatron-core[training]==0.19.2"`). Default: the project venv if it has
# CUDA, else python3. The repository itself is put on PYTHONPATH; nothing is installed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV_PY="$HOME/.cache/prores-megatron/venv-py3.12-torch2.11.0-mcore0.19.2/bin/python"
if [[ -z "${PYTHON:-}" ]]; then
    PYTHON=python3
    if [[ -x "$VENV_PY" ]] && "$VENV_PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
        PYTHON="$VENV_PY"
    fi
fi
if ! "$PYTHON" -c "import torch, megatron.core" 2>/dev/null; then
    echo "gpu_check.sh: $PYTHON cannot import torch and megatron.core; set PYTHON (see the header)" >&2
    exit 2
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" CUDA_DEVICE_MAX_CONNECTIONS=1 PYTHONUNBUFFERED=1
cd "$ROOT"
# 470 s: the whole check stays under 8 minutes even if one item hangs.
exec timeout 470 "$PYTHON" tools/gpu_check.py "$@"
