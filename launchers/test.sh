#!/usr/bin/env bash
# The test suite: launchers/test.sh [pytest arguments]. Creates .venv first when missing,
# runs ruff, then pytest.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=launchers/env.sh
source "$ROOT/launchers/env.sh"
fedgpu_ensure_env "$ROOT" "test,text"  # text: the text-imdb task's tests need transformers
cd "$ROOT"
# Offline and quiet: the tests make their own data and need no hub.
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
# Lint first: a ruff finding fails the run, with ruff's own lines (config in pyproject.toml).
"$ROOT/.venv/bin/ruff" check "$ROOT"
# Two test files at a time (FEDGPU_TEST_WORKERS; 0 for one process): most of a federation's time is waiting
# (for a SuperLink, a round, a timeout), so two share two cores well. A file's tests stay together, in order,
# so a module's shared federation starts once.
exec "$ROOT/.venv/bin/python" -m pytest -n "${FEDGPU_TEST_WORKERS:-2}" --dist loadfile "$@"
