#!/usr/bin/env bash
# Create or reuse the Python 3.12 virtual environment that every prores-megatron command runs in,
# and (re)install this checkout into it. Source it: `source tools/setup_env.sh`; afterwards
# $PRORES_PY is the interpreter. Reuse is keyed on the pinned stack, so a second run costs seconds.
#   PRORES_PYTHON  a Python 3.12 interpreter to build the venv with (default: found on PATH/pyenv)
#   PRORES_VENV    where the venv lives (default: ~/.cache/prores-megatron/venv-<stack>)
set -euo pipefail

PRORES_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The stack is pinned exactly: a torch range would pull a different multi-GB CUDA build.
PRORES_STACK=(torch==2.11.0 "megatron-core[training]==0.19.2")
PRORES_EXTRA=(pytest==9.2.0 ruff==0.17.5 tensorboard safetensors sentencepiece transformers matplotlib "lm-eval[hf]==0.4.13")
PRORES_STAMP="py3.12-torch2.11.0-mcore0.19.2"
PRORES_VENV="${PRORES_VENV:-$HOME/.cache/prores-megatron/venv-$PRORES_STAMP}"

_prores_find_python() {
    local cand
    if [[ -n "${PRORES_PYTHON:-}" ]]; then
        echo "$PRORES_PYTHON"; return 0
    fi
    for cand in python3.12 python3; do
        if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
            command -v "$cand"; return 0
        fi
    done
    if command -v pyenv >/dev/null 2>&1; then
        cand="$(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.[0-9]+)?$' | sort -V | tail -1 || true)"
        if [[ -n "$cand" ]]; then
            echo "$(pyenv root)/versions/$cand/bin/python3"; return 0
        fi
    fi
    return 1
}

_prores_want="$(printf '%s\n' "${PRORES_STACK[@]}")"
_prores_want_extra="$(printf '%s\n' "${PRORES_EXTRA[@]}")"
if [[ ! -x "$PRORES_VENV/bin/python" || "$(cat "$PRORES_VENV/.prores-ready" 2>/dev/null)" != "$_prores_want" ]]; then
    if ! _prores_py="$(_prores_find_python)"; then
        echo "prores-megatron: Python 3.12 not found (megatron-core 0.19 requires Python >= 3.12)." >&2
        echo "  Install it (e.g. 'pyenv install 3.12.1' or your distribution's python3.12 package)," >&2
        echo "  or point PRORES_PYTHON at a Python 3.12 interpreter, then run this command again." >&2
        return 1 2>/dev/null || exit 1
    fi
    echo "prores-megatron: building the environment in $PRORES_VENV with $_prores_py (one-off, a few minutes)"
    rm -rf "$PRORES_VENV"
    "$_prores_py" -m venv "$PRORES_VENV"
    _prores_log="$PRORES_VENV/install.log"
    if ! { "$PRORES_VENV/bin/python" -m pip install --upgrade pip \
           && "$PRORES_VENV/bin/python" -m pip install "${PRORES_STACK[@]}"; } >"$_prores_log" 2>&1; then
        tail -20 "$_prores_log" >&2
        echo "prores-megatron: installing the stack failed (full log: $_prores_log)" >&2
        return 1 2>/dev/null || exit 1
    fi
    echo "$_prores_want" > "$PRORES_VENV/.prores-ready"
fi
if [[ "$(cat "$PRORES_VENV/.prores-extra" 2>/dev/null)" != "$_prores_want_extra" ]]; then
    # Tools and test dependencies change more often than the stack: add them in place.
    if ! "$PRORES_VENV/bin/python" -m pip install "${PRORES_STACK[@]}" "${PRORES_EXTRA[@]}" >"$PRORES_VENV/install-extra.log" 2>&1; then
        tail -20 "$PRORES_VENV/install-extra.log" >&2
        echo "prores-megatron: installing ${PRORES_EXTRA[*]} failed (log: $PRORES_VENV/install-extra.log)" >&2
        return 1 2>/dev/null || exit 1
    fi
    echo "$_prores_want_extra" > "$PRORES_VENV/.prores-extra"
fi
# Megatron-Bridge for tests/bridge, without its dependency tree (transformers <= 5.12.1, modelopt,
# Transformer Engine, ... need CUDA or clash with the stack): the modules ProRes uses are pure Python
# and need only what the stack and PRORES_EXTRA already hold (omegaconf, pyyaml, transformers).
PRORES_BRIDGE=(megatron-bridge==0.6.2)
if [[ "$(cat "$PRORES_VENV/.prores-bridge" 2>/dev/null)" != "${PRORES_BRIDGE[*]}" ]]; then
    if ! "$PRORES_VENV/bin/python" -m pip install --no-deps "${PRORES_BRIDGE[@]}" >"$PRORES_VENV/install-bridge.log" 2>&1; then
        tail -20 "$PRORES_VENV/install-bridge.log" >&2
        echo "prores-megatron: installing ${PRORES_BRIDGE[*]} failed (log: $PRORES_VENV/install-bridge.log)" >&2
        return 1 2>/dev/null || exit 1
    fi
    echo "${PRORES_BRIDGE[*]}" > "$PRORES_VENV/.prores-bridge"
fi
# --no-deps: the stack above is already pinned; the package itself never asks for torch.
if ! "$PRORES_VENV/bin/python" -m pip install --no-deps --no-build-isolation -e "$PRORES_REPO" >"$PRORES_VENV/install-package.log" 2>&1; then
    tail -20 "$PRORES_VENV/install-package.log" >&2
    echo "prores-megatron: installing $PRORES_REPO failed (log: $PRORES_VENV/install-package.log)" >&2
    return 1 2>/dev/null || exit 1
fi
export PRORES_PY="$PRORES_VENV/bin/python"
export PRORES_REPO
