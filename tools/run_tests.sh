#!/usr/bin/env bash
# The test suite: sets up the environment if needed, lints (ruff, configured in ruff.toml), then runs
# pytest over tests/. Extra arguments go to pytest.
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/setup_env.sh"
cd "$PRORES_REPO"
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
"$PRORES_PY" -m ruff check --no-cache "$PRORES_REPO"
exec "$PRORES_PY" -m pytest tests -q -rs --durations=15 "$@"
