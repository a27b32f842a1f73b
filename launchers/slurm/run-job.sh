#!/usr/bin/env bash
# A fedgpu federation over a Slurm allocation: the server on its first node, client nodes dealt
# over all its nodes, one zygote per node, logs per node. Run inside the allocation:
#
#   sbatch launchers/slurm/fedgpu.sbatch [clients] [min] [sampled] [rounds] [options]
#   salloc -N 2 --gpus-per-node=4 launchers/slurm/run-job.sh 16 16 8 5 --task cifar10 --data-files /data/cifar10
#
# options: --task NAME  --no-mp  --tls  --port P (9092)  --run-dir DIR (runs/slurm-<job id>)  --dry-run (print the
# srun commands, start nothing); other options go to every step's `fedgpu run` (e.g. --lr 0.1 --data-files DIR).
# The checkout (and its .venv) and the run directory must be on a file system every node sees.
# The job ends when the server's step does, or when a node's step fails first (exit 1).
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
GRACE_SECONDS=10

args=() dry_run=0
for arg in "$@"; do
    case $arg in
    -h | --help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --dry-run) dry_run=1 ;;
    *) args+=("$arg") ;;
    esac
done

# fedgpu.slurm checks the job's options and plans its steps; it needs only the standard library (no
# environment yet for a dry run). Bad input: its one line, exit 2.
make_plan() { PYTHONPATH=$ROOT python3 -m fedgpu.slurm --root "$ROOT" --prog run-job.sh "$@" -- "${args[@]}"; }
if ((dry_run)); then
    make_plan
    exit
fi
plan=$(make_plan --format json) || exit
# plan_get KEY...: one value of the plan, read by Python (a list: NUL-terminated items; a final '#': its length).
plan_get() {
    python3 -c '
import json, sys
value = json.loads(sys.argv[1])
keys = sys.argv[2:]
for key in keys[:-1] if keys[-1:] == ["#"] else keys:
    value = value[int(key)] if isinstance(value, list) else value[key]
if keys[-1:] == ["#"]:
    value = len(value)
sys.stdout.write("".join(f"{item}\0" for item in value) if isinstance(value, list) else str(value))
' "$plan" "$@"
}
if ! { run_dir=$(plan_get run_dir) && task=$(plan_get task) && tls=$(plan_get tls) && count=$(plan_get steps '#'); }; then
    echo "run-job.sh: cannot read the plan" >&2
    exit 1
fi

# shellcheck source=launchers/env.sh
source "$ROOT/launchers/env.sh"
fedgpu_ensure_env "$ROOT" "$(fedgpu_extras_for_task "$task")" || { echo "run-job.sh: could not set up $ROOT/.venv" >&2; exit 1; }
if [[ $tls == True ]]; then
    "$ROOT/launchers/make-certs.sh" "$run_dir/certs" --nodes "$(plan_get clients)" --host "$(plan_get server_host)" >/dev/null ||
        { echo "run-job.sh: could not create certificates in $run_dir/certs" >&2; exit 1; }
fi

pids=() names=()
stop_steps() {
    local pid deadline alive
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null; done  # srun passes TERM on to its task
    deadline=$((SECONDS + GRACE_SECONDS))
    while ((SECONDS < deadline)); do
        alive=0
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        ((alive)) || break
        sleep 0.2
    done
    for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null; done
    wait 2>/dev/null
    pids=()
}
trap 'echo "run-job.sh: stopping the job steps" >&2; stop_steps; exit 143' TERM
trap 'stop_steps; exit 130' INT
trap 'stop_steps' EXIT

echo "run-job.sh: job $(plan_get job): $count steps; run directory $run_dir"
# Every step's processes carry the job's run directory: the server's monitor finds them by it, and the
# server's step knows the directory (and the certificates in it) as this job's.
export FEDGPU_RUN_DIR=$run_dir
step_file=$(mktemp "${TMPDIR:-/tmp}/fedgpu-step.XXXXXX") || exit 1
for ((i = 0; i < count; i++)); do
    # A step's argv as its items: no eval, no word splitting.
    if ! { plan_get steps "$i" argv >"$step_file" && readarray -d '' -t step <"$step_file" && name=$(plan_get steps "$i" name); }; then
        echo "run-job.sh: cannot read step $i of the plan" >&2
        exit 1
    fi
    names+=("$name")
    "${step[@]}" &
    pids+=("$!")
    if ((i == 0)); then
        # Client nodes connect once the SuperLink is up (they would retry, but fail fast on a typo).
        for _ in $(seq 600); do
            grep -q "SuperLink ready on" "$run_dir/server.log" 2>/dev/null && break
            kill -0 "${pids[0]}" 2>/dev/null || break
            sleep 0.2
        done
        kill -0 "${pids[0]}" 2>/dev/null || break  # the server's step is over: start no node
    fi
done
rm -f "$step_file"

# Until the server's step ends, or a node's step fails first: that node's share is gone, the job cannot finish.
# `wait -n` reaps one step; it is the one no longer there.
while :; do
    wait -n
    code=$?
    for i in "${!pids[@]}"; do
        kill -0 "${pids[$i]}" 2>/dev/null && continue
        if ((i == 0)); then
            ((code == 0)) || echo "run-job.sh: the server's step exited with $code; see $run_dir/server.log" >&2
            exit "$code"
        fi
        if ((code != 0)); then
            echo "run-job.sh: step '${names[$i]}' exited with $code before the server's; stopping the job" >&2
            exit 1
        fi
        unset "pids[$i]"
    done
done
