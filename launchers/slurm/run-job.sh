#!/usr/bin/env bash
# A fedgpu federation over a Slurm allocation: the server on its first node, client nodes dealt
# over all its nodes, one zygote per node, logs per node. Run inside the allocation:
#
#   sbatch launchers/slurm/fedgpu.sbatch [clients] [min] [sampled] [rounds] [options]
#   salloc -N 2 --gpus-per-node=4 launchers/slurm/run-job.sh 16 16 8 5 --task cifar10 --data-files /data/cifar10
#
# options: --task NAME  --no-mp  --tls  --port P (9092)  --run-dir DIR (runs/slurm-<job id>)  --dry-run (print the
# srun commands, start nothing); other options go to `fedgpu server` (e.g. --lr 0.1 --data-files DIR).
# The checkout (and its .venv) and the run directory must be on a file system every node sees.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
GRACE_SECONDS=10

die_usage() { echo "run-job.sh: $1" >&2; exit 2; }
positional=() plan_args=() server_args=() dry_run=0 tls=0 run_dir="" task=digits
while (($#)); do
    case $1 in
    -h | --help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --dry-run) dry_run=1 && shift ;;
    --no-mp) plan_args+=(--no-mp) && shift ;;
    --tls) tls=1 && plan_args+=(--tls) && shift ;;
    --port | --task | --run-dir)
        (($# >= 2)) || die_usage "option $1 needs a value"
        case $1 in --run-dir) run_dir=$2 ;; --task) task=$2 && plan_args+=(--task "$2") ;; *) plan_args+=("$1" "$2") ;; esac
        shift 2
        ;;
    --*=*) server_args+=("--server-arg=$1") && shift ;;
    --*)
        server_args+=("--server-arg=$1")
        if (($# >= 2)) && [[ $2 != --* ]]; then server_args+=("--server-arg=$2") && shift; fi
        shift
        ;;
    *) positional+=("$1") && shift ;;
    esac
done
# shellcheck source=launchers/common.sh
source "$ROOT/launchers/common.sh"
fedgpu_read_shape "${positional[@]}"
positional=("$clients" "$min" "$sampled" "$rounds")
[[ -n ${SLURM_JOB_ID:-} ]] || die_usage "not inside a Slurm allocation (no SLURM_JOB_ID): submit with sbatch or run under salloc"
run_dir=${run_dir:-$ROOT/runs/slurm-$SLURM_JOB_ID}
mkdir -p "$run_dir" 2>/dev/null && [[ -w $run_dir ]] || die_usage "run directory $run_dir is not writable"
run_dir=$(cd "$run_dir" && pwd)

# The plan needs only the standard library: no environment yet for a dry run.
plan=$(PYTHONPATH=$ROOT python3 -m fedgpu.slurm "${positional[@]}" --run-dir "$run_dir" --root "$ROOT" "${plan_args[@]}" \
    "${server_args[@]}" 2>&1) || die_usage "$(tail -n 1 <<<"$plan" | sed 's/^fedgpu.slurm: //')"
if ((dry_run)); then
    printf '%s\n' "$plan"
    exit 0
fi

# shellcheck source=launchers/env.sh
source "$ROOT/launchers/env.sh"
fedgpu_ensure_env "$ROOT" "$(fedgpu_extras_for_task "$task")" || { echo "run-job.sh: could not set up $ROOT/.venv" >&2; exit 1; }
if ((tls)); then
    server_host=$(sed -n '1s/.*--nodelist=\([^ ]*\).*/\1/p' <<<"$plan")
    "$ROOT/launchers/make-certs.sh" "$run_dir/certs" --nodes "${positional[0]}" --host "$server_host" >/dev/null ||
        { echo "run-job.sh: could not create certificates in $run_dir/certs" >&2; exit 1; }
fi

steps=()
stop_steps() {
    local pid deadline
    for pid in "${steps[@]}"; do kill -TERM "$pid" 2>/dev/null; done  # srun passes TERM on to its task
    deadline=$((SECONDS + GRACE_SECONDS))
    while ((SECONDS < deadline)); do
        local alive=0
        for pid in "${steps[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        ((alive)) || break
        sleep 0.2
    done
    for pid in "${steps[@]}"; do kill -KILL "$pid" 2>/dev/null; done
    wait 2>/dev/null
    steps=()
}
trap 'echo "run-job.sh: stopping the job steps" >&2; stop_steps; exit 143' TERM
trap 'stop_steps; exit 130' INT
trap 'stop_steps' EXIT

echo "run-job.sh: job $SLURM_JOB_ID: ${positional[*]} (clients min sampled rounds); run directory $run_dir"
# The server's step finds its log here already: the directory is this job's, not an earlier run's.
export FEDGPU_RUN_DIR=$run_dir
first=1
while IFS= read -r line; do
    eval "step=($line)"
    if ((first)); then
        "${step[@]}" 2>"$run_dir/server.log" &  # its rounds and summary on the job's output
        server=$!
        first=0
        # Client nodes connect once the SuperLink is up (they would retry, but fail fast on a typo).
        for _ in $(seq 600); do
            grep -q "SuperLink ready on" "$run_dir/server.log" 2>/dev/null && break
            kill -0 "$server" 2>/dev/null || break
            sleep 0.2
        done
    else
        "${step[@]}" &
    fi
    steps+=("$!")
done <<<"$plan"
wait "$server"
status=$?
((status == 0)) || echo "run-job.sh: the server exited with $status; see $run_dir/server.log" >&2
exit "$status"
