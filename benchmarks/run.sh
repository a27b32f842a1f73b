#!/usr/bin/env bash
# All benchmarks, one after the other, on a quiet machine: benchmarks/run.sh [name...]
# Names: overhead idle_memory idle_cpu transfer round_time at_rest task_rounds app_rounds zygote_stall sim_rounds (default: all). Results land in
# benchmarks/results/NAME.md (the table) and NAME.json (the raw samples).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=launchers/env.sh
source "$ROOT/launchers/env.sh"
fedgpu_ensure_env "$ROOT" "test,bench,text"  # text: task_rounds runs text-imdb
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
names=("$@")
((${#names[@]})) || names=(transfer overhead idle_memory idle_cpu round_time at_rest task_rounds app_rounds zygote_stall sim_rounds)
for name in "${names[@]}"; do
    [[ -f $ROOT/benchmarks/$name.py ]] || { echo "benchmarks/run.sh: no benchmark named '$name'" >&2; exit 2; }
done
for name in "${names[@]}"; do
    echo "== $name" >&2
    "$ROOT/.venv/bin/python" "$ROOT/benchmarks/$name.py"
done
