#!/usr/bin/env bash
# ./run.sh [clients] [min] [sampled] [rounds] [options]: a whole federation on this host.
# Sets up .venv when it is missing, reads the four numbers (defaults 10 10 5 3), and hands
# everything else to `fedgpu run`, which owns the processes: ./run.sh --help lists its options.
# ./run.sh [clients] --app APP_DIR [options] runs a Flower app of yours the same way.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=launchers/common.sh
source "$ROOT/launchers/common.sh"

# Until the launcher takes over this process (exec, below), a signal stops the set-up.
trap 'echo "run.sh: SIGINT received, stopping" >&2; exit 130' INT
trap 'echo "run.sh: SIGTERM received, stopping" >&2; exit 143' TERM

die_usage() {
    echo "run.sh: $1" >&2
    exit 2
}

usage() {
    cat <<'USAGE'
usage: ./run.sh [clients] [min] [sampled] [rounds] [options]     (defaults 10 10 5 3)
       ./run.sh [clients] --app APP_DIR [options]                 (a Flower app of yours)
  clients  client nodes to start        min      clients connected before round 1
  sampled  clients that train per round rounds   federated rounds
The numbers come first; every option is `fedgpu run`'s:
USAGE
}

positional=() forward=() task=digits app=""
while (($#)) && [[ $1 != -* ]]; do positional+=("$1") && shift; done
while (($#)); do
    case $1 in
    -h | --help) usage && [[ -x $ROOT/.venv/bin/fedgpu ]] && "$ROOT/.venv/bin/fedgpu" run --help | sed -n '/^Options:/,$p'; exit 0 ;;
    --app) (($# >= 2)) || die_usage "option --app needs a value"; app=$2 && shift 2 ;;
    --task) (($# >= 2)) || die_usage "option --task needs a value"; task=$2 && forward+=("$1" "$2") && shift 2 ;;
    --task=*) task=${1#--task=} && forward+=("$1") && shift ;;
    *) forward+=("$1") && shift ;;
    esac
done

shape=()
if [[ -n $app ]]; then
    ((${#positional[@]} <= 1)) ||
        die_usage "with --app give only <clients>: the app's own config decides sampling and rounds (change it with --run-config)"
    if ((${#positional[@]})); then
        fedgpu_read_shape "${positional[0]}"
        shape=(--nodes "$clients")
    fi
    shape=("$app" "${shape[@]}")
else
    fedgpu_read_shape "${positional[@]}"
    shape=(--nodes "$clients" --min-clients "$min" --sampled "$sampled" --rounds "$rounds")
fi

# shellcheck source=launchers/env.sh
source "$ROOT/launchers/env.sh"
fedgpu_ensure_env "$ROOT" "$(fedgpu_extras_for_task "$task")" || { echo "run.sh: could not set up $ROOT/.venv" >&2; exit 1; }

# The launcher checks everything before it starts anything, and owns what it starts; its
# one-line errors name us. It becomes this process: Ctrl-C and TERM reach it directly.
export FEDGPU_PROG=run.sh
exec "$ROOT/.venv/bin/fedgpu" run "${shape[@]}" "${forward[@]}"
