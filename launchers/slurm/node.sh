#!/usr/bin/env bash
# One Slurm node's share of a fedgpu federation: its zygote and its client nodes.
# Started by run-job.sh through srun, one per node; TERM (from srun) stops all it started.
#
#   node.sh --superlink HOST:PORT --run-dir DIR --log-dir DIR --task T --num-partitions N --clients 0,3,6
#           [--no-mp] [--certs DIR] -- [fedgpu client options]
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
FEDGPU=$ROOT/.venv/bin/fedgpu
GRACE_SECONDS=5

die_usage() { echo "node.sh: $1" >&2; exit 2; }
superlink="" run_dir="" log_dir="" task=digits partitions="" clients="" mp=1 certs="" extra=()
while (($#)); do
    case $1 in
    --no-mp) mp=0 && shift ;;
    --) shift && extra=("$@") && break ;;
    --superlink | --run-dir | --log-dir | --task | --num-partitions | --clients | --certs)
        (($# >= 2)) || die_usage "option $1 needs a value"
        case $1 in
        --superlink) superlink=$2 ;; --run-dir) run_dir=$2 ;; --log-dir) log_dir=$2 ;; --task) task=$2 ;;
        --num-partitions) partitions=$2 ;; --clients) clients=$2 ;; --certs) certs=$2 ;;
        esac
        shift 2
        ;;
    *) die_usage "unknown argument $1" ;;
    esac
done
[[ -n $superlink && -n $run_dir && -n $log_dir && $partitions =~ ^[0-9]+$ && $clients =~ ^[0-9]+(,[0-9]+)*$ ]] ||
    die_usage "needs --superlink, --run-dir, --log-dir, --num-partitions N and --clients i,j,..."
mkdir -p "$log_dir" || die_usage "cannot create $log_dir"

# shellcheck source=launchers/common.sh
source "$ROOT/launchers/common.sh"
started=()
zygote_dir=""
stop_all() {
    fedgpu_stop_groups "$GRACE_SECONDS" "${started[@]}"
    started=()
    [[ -z $zygote_dir ]] || rm -rf "$zygote_dir"
}
trap 'stop_all; exit 143' TERM
trap 'stop_all; exit 130' INT
trap 'stop_all' EXIT

# Every process of the job carries the job's run directory: the server's monitor finds them by it.
export FEDGPU_RUN_DIR=$run_dir FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
mp_flag=--mp
if ((mp)); then
    zygote_dir=$(mktemp -d "${TMPDIR:-/tmp}/fedgpu-zygote.XXXXXX") || die_usage "cannot create a private directory for the zygote"
    export FEDGPU_ZYGOTE=$zygote_dir
    setsid "$FEDGPU" zygote --dir "$zygote_dir" --task "$task" --parent-pid $$ >"$log_dir/zygote.log" 2>&1 &
    started+=("$!")
else
    mp_flag=--no-mp
fi
IFS=, read -r -a ids <<<"$clients"
for i in "${ids[@]}"; do
    security=()
    [[ -z $certs ]] || security=(--root-certificates "$certs/ca.crt" --auth-private-key "$certs/nodes/node-$i")
    setsid "$FEDGPU" client "$mp_flag" --superlink "$superlink" --partition-id "$i" --num-partitions "$partitions" \
        --task "$task" --parent-pid $$ "${security[@]}" "${extra[@]}" >"$log_dir/client-$i.log" 2>&1 &
    started+=("$!")
done
echo "node.sh: $(hostname): ${#ids[@]} client nodes (${clients}) for $superlink; logs in $log_dir"
wait
