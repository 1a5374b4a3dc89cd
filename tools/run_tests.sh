#!/usr/bin/env bash
# The test suite: sets up the environment if needed, then runs pytest over tests/.
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/setup_env.sh"
cd "$PRORES_REPO"
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
exec "$PRORES_PY" -m pytest tests -q -rs --durations=15 "$@"
