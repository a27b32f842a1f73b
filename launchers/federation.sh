#!/usr/bin/env bash
# ./run.sh [clients] [min] [sampled] [rounds] [options]: a whole federation on this host.
# Sets up .venv when it is missing, then becomes `fedgpu run`, which reads the numbers
# (defaults 10 10 5 3) and every option, and owns the processes: ./run.sh --help.
# ./run.sh [clients] --app APP_DIR [options] runs a Flower app of yours the same way.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# Until the launcher takes over this process (exec, below), a signal stops the set-up.
trap 'echo "run.sh: SIGINT received, stopping" >&2; exit 130' INT
trap 'echo "run.sh: SIGTERM received, stopping" >&2; exit 143' TERM

# The one option read here: the task decides the environment's extras (text-imdb needs transformers).
task=digits
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case ${args[$i]} in
    --task) task=${args[$((i + 1))]:-} ;;
    --task=*) task=${args[$i]#--task=} ;;
    esac
done

# shellcheck source=launchers/env.sh
source "$ROOT/launchers/env.sh"
fedgpu_ensure_env "$ROOT" "$(fedgpu_extras_for_task "$task")" || { echo "run.sh: could not set up $ROOT/.venv" >&2; exit 1; }

# The launcher checks everything before it starts anything, and owns what it starts; its
# one-line errors name us. It becomes this process: Ctrl-C and TERM reach it directly.
export FEDGPU_PROG=run.sh
exec "$ROOT/.venv/bin/fedgpu" run "$@"
