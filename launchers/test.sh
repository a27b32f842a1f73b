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
# Test files run in parallel, two per core (FEDGPU_TEST_WORKERS; 0 for one process): much of a federation's
# time is waiting (for a SuperLink, a round, a start timeout), which other files' CPU work fills. Fewer where
# memory is short: a federation's processes take up to ~3 GiB at once. A file's tests stay together, in order,
# so a module's shared federation starts once; the longest files go first (tests/file_seconds.json, see
# tests/conftest.py), so that none starts last and runs alone.
cores=$(nproc 2>/dev/null || echo 2)
mem_gib=$(awk '/^MemAvailable:/ {print int($2 / 1048576)}' /proc/meminfo 2>/dev/null || echo 8)
workers=$(( 2 * cores < mem_gib / 4 ? 2 * cores : mem_gib / 4 ))
workers=${FEDGPU_TEST_WORKERS:-$(( workers > 1 ? workers : 1 ))}
exec "$ROOT/.venv/bin/python" -m pytest -n "$workers" --dist loadfile --no-loadscope-reorder "$@"
