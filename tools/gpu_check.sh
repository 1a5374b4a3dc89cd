#!/usr/bin/env bash
# The project's GPU check: one command, PASS/FAIL/SKIP per item with numbers, under 8 minutes on one
# H100/H200 (items and pass marks: tools/gpu_check.py; docs/benchmarks.md §4; the output goes in
# README.md).
#
#   bash tools/gpu_check.sh --prepare          # on a CPU machine with network: wheels into .whl/
#   bash tools/gpu_check.sh [--items a,b,...]  # on the GPU machine (no network needed)
#   bash tools/gpu_check.sh --rehearse         # on CPU: the GPU runs' arguments, shim off (CI runs it)
#
# --prepare downloads into the git-ignored .whl/ exactly what a GPU machine with CUDA torch 2.11 but
# no Megatron lacks: the megatron-core 0.19.2 wheel (cp312, x86-64). Its other requirements are
# already there or imported lazily (wandb, omegaconf, flask-restful are never imported by the check;
# `--rehearse` proves it with them blocked). It then checks that the tree plus .whl/ fits the 64 MiB
# that travels to the GPU machine, and prints the command to run there.
#
# On the GPU machine, when PYTHON (default python3, or the project venv if it has CUDA) cannot import
# megatron.core, the wheel in .whl/ is installed with `pip install --no-index --no-deps --target` into
# a scratch folder put first on PYTHONPATH; nothing else is installed and nothing is downloaded.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHL="${GPU_CHECK_WHL:-$ROOT/.whl}"  # GPU_CHECK_WHL: another folder (tests)
MCORE_PIN="megatron-core==0.19.2"
LIMIT_MIB=64

if [[ "${1:-}" == "--prepare" ]]; then
    source "$ROOT/tools/setup_env.sh"
    rm -rf "$WHL.partial" && mkdir -p "$WHL.partial"
    # The GPU machine's interpreter is CPython 3.12 on x86-64 Linux; megatron-core has a compiled
    # extension (the dataset helpers), so the wheel is platform-specific.
    "$PRORES_PY" -m pip download --quiet --no-deps --only-binary=:all: --implementation cp \
        --python-version 3.12 --platform manylinux_2_28_x86_64 -d "$WHL.partial" "$MCORE_PIN"
    rm -rf "$WHL" && mv "$WHL.partial" "$WHL"  # complete or absent, never half
    cd "$ROOT"
    tree_bytes=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s -- 2>/dev/null \
        | awk '{s += $1} END {print s + 0}')
    whl_bytes=$(du -sb "$WHL" | cut -f1)
    total=$((tree_bytes + whl_bytes))
    printf 'gpu_check --prepare: %s\n' "$(cd "$WHL" && ls)"
    awk -v t="$tree_bytes" -v w="$whl_bytes" -v l="$LIMIT_MIB" 'BEGIN {
        printf "gpu_check --prepare: tree %.1f MiB + .whl %.1f MiB = %.1f MiB (limit %d MiB)\n",
               t / 1048576, w / 1048576, (t + w) / 1048576, l }'
    if (( total >= LIMIT_MIB * 1048576 )); then
        echo "gpu_check --prepare: FAIL: over the ${LIMIT_MIB} MiB that travels to the GPU machine" >&2
        exit 1
    fi
    echo "gpu_check --prepare: ready. On the GPU machine, from the repository root, with .whl carried:"
    echo "    bash tools/gpu_check.sh"
    exit 0
fi

if [[ "${1:-}" == "--rehearse" ]]; then
    shift
    source "$ROOT/tools/setup_env.sh"
    cd "$ROOT"
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    exec "$PRORES_PY" tools/gpu_check.py --rehearse "$@"
fi

VENV_PY="$HOME/.cache/prores-megatron/venv-py3.12-torch2.11.0-mcore0.19.2/bin/python"
if [[ -z "${PYTHON:-}" ]]; then
    PYTHON=python3
    if [[ -x "$VENV_PY" ]] && "$VENV_PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
        PYTHON="$VENV_PY"
    fi
fi
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "gpu_check.sh: $PYTHON cannot import torch; set PYTHON to the interpreter with CUDA torch" >&2
    exit 2
fi
if ! "$PYTHON" -c "import megatron.core" 2>/dev/null; then
    shopt -s nullglob
    wheels=("$WHL"/megatron_core-*.whl)
    if (( ${#wheels[@]} == 0 )); then
        echo "gpu_check.sh: $PYTHON has no megatron-core and $WHL holds no wheel: run" >&2
        echo "  'bash tools/gpu_check.sh --prepare' on a machine with network, and bring .whl/ along" >&2
        exit 2
    fi
    SITE="${TMPDIR:-/tmp}/prores_gpu_check_site"
    rm -rf "$SITE"
    "$PYTHON" -m pip install --quiet --no-index --no-deps --target "$SITE" "${wheels[@]}"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    echo "gpu_check.sh: megatron-core installed from ${wheels[*]##*/} into $SITE (scratch)"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" CUDA_DEVICE_MAX_CONNECTIONS=1 PYTHONUNBUFFERED=1
cd "$ROOT"
# 470 s: the whole check stays under 8 minutes even if one item hangs.
exec timeout 470 "$PYTHON" tools/gpu_check.py "$@"
