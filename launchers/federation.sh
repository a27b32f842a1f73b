#!/usr/bin/env bash
# A fedgpu federation on this host: one server (SuperLink + ServerApp) and N client
# nodes in the background, each logging to its own file in the run directory.
# Ctrl-C or TERM at any moment stops everything this script started.
#
#   launchers/federation.sh [clients] [min] [sampled] [rounds] [options]   (defaults: 10 10 5 3)
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GRACE_SECONDS=5
READY_TIMEOUT=120

# shellcheck source=launchers/common.sh
source "$ROOT/launchers/common.sh"

started=()  # leaders of the process groups we started
stopping=0
zygote_dir=""

stop_all() {
    ((${#started[@]})) || return 0
    fedgpu_stop_groups "$GRACE_SECONDS" "${started[@]}"
    wait 2>/dev/null
    started=()
    [[ -z $zygote_dir ]] || rm -rf "$zygote_dir"
}

on_signal() {
    ((stopping)) && return
    stopping=1
    echo "run.sh: $1 received, stopping the federation" >&2
    stop_all
    exit $((128 + $2))
}

# Installed before anything starts, even the environment set-up.
trap 'on_signal SIGINT 2' INT
trap 'on_signal SIGTERM 15' TERM
trap 'stop_all' EXIT

usage() {
    cat <<'USAGE'
usage: ./run.sh [clients] [min] [sampled] [rounds] [options]
  clients  client nodes to start (default 10)
  min      clients connected before round 1 starts (default 10)
  sampled  clients that train in each round (default 5)
  rounds   federated rounds (default 3)
options:
  --task NAME          digits (default), cifar10, vit-flowers, text-imdb, a task
                       another package registers, or package.module:TaskClass
  --task-option K=V    a task's own option, e.g. weights=none (repeatable)
  --no-mp              run each message inside the long-lived client (baseline)
  --tls                TLS and SuperNode authentication on 127.0.0.1: a CA, the
                       SuperLink's certificate and one key per node are made in
                       RUN_DIR/certs (launchers/make-certs.sh)
  --port P             SuperLink port (default: a free one)
  --force              start even when this host seems too small for the clients
  --run-dir DIR        output directory (default: runs/<timestamp>)
  --timeout S          seconds a message may run before its child is killed
  --isolation MODE     zygote (default: one warm process per host forks each
                       message's child) or spawn (a fresh interpreter each)
  server options passed through: --eval-sampled --lr --lr-decay --local-epochs
    --batch-size --partitioner --alpha --seed --data-files --device --threads
    --message-timeout
  GPU placement (server's evaluation and client children alike):
  --gpus 0,2           GPUs children may use (default: all visible)
  --placement P        free (default: most free memory) or round-robin
  --gpu-mem MIB        a child's estimated peak until one is measured (1024)
  --admission-timeout S  how long a child waits for GPU memory (600)
USAGE
}

die_usage() {
    echo "run.sh: $1" >&2
    exit 2
}

positional=()
server_args=()
client_args=()
mp=1
task=digits
isolation=zygote
port=""
port_given=0
run_dir=""
gpus=""
tls=0
force=0
while (($#)); do
    case $1 in
    -h | --help)
        usage
        exit 0
        ;;
    --no-mp) mp=0 && shift ;;
    --tls) tls=1 && shift ;;
    --force) force=1 && shift ;;
    --task | --port | --run-dir | --timeout | --eval-sampled | --lr | --lr-decay | --local-epochs | --batch-size | \
        --partitioner | --alpha | --seed | --data-files | --task-option | --device | --threads | --message-timeout | --start-timeout | --isolation | \
        --gpus | --placement | --gpu-mem | --admission-timeout)
        (($# >= 2)) || die_usage "option $1 needs a value"
        case $1 in
        --task) task=$2 ;;
        --isolation) isolation=$2 ;;
        --port) port=$2 && port_given=1 ;;
        --run-dir) run_dir=$2 ;;
        --timeout) client_args+=(--timeout "$2") ;;
        --gpus)
            [[ $2 =~ ^[0-9]+(,[0-9]+)*$ ]] || die_usage "--gpus must be GPU indices separated by commas, like 0,2; got '$2'"
            gpus=$2 && server_args+=("$1" "$2") && client_args+=("$1" "$2")
            ;;
        --placement)
            [[ $2 == free || $2 == round-robin ]] || die_usage "--placement must be free or round-robin, got '$2'"
            server_args+=("$1" "$2") && client_args+=("$1" "$2")
            ;;
        --gpu-mem | --admission-timeout)
            [[ $2 =~ ^[0-9]*\.?[0-9]+$ && ! $2 =~ ^0*\.?0*$ ]] || die_usage "$1 must be a number > 0, got '$2'"
            server_args+=("$1" "$2") && client_args+=("$1" "$2")
            ;;
        *) server_args+=("$1" "$2") ;;
        esac
        shift 2
        ;;
    -*) die_usage "unknown option $1 (see ./run.sh --help)" ;;
    *) positional+=("$1") && shift ;;
    esac
done

fedgpu_read_shape "${positional[@]}"
if ((port_given)); then
    [[ $port =~ ^[0-9]{1,5}$ ]] && ((10#$port >= 1 && 10#$port <= 65535)) || die_usage "--port must be 1..65535, got '$port'"
    port=$((10#$port))
fi
[[ -z $gpus ]] || ((mp)) || die_usage "--gpus needs the children of --mp (drop --no-mp)"
[[ $isolation == zygote || $isolation == spawn ]] || die_usage "--isolation must be zygote or spawn, got '$isolation'"
server_args+=(--task "$task" --isolation "$isolation")
client_args+=(--task "$task" --isolation "$isolation")
command -v setsid >/dev/null || die_usage "setsid (util-linux) is required"

# shellcheck source=launchers/env.sh
source "$ROOT/launchers/env.sh"
fedgpu_ensure_env "$ROOT" "$(fedgpu_extras_for_task "$task")" || { echo "run.sh: could not set up $ROOT/.venv" >&2; exit 1; }
PY=$ROOT/.venv/bin/python
FEDGPU=$ROOT/.venv/bin/fedgpu

[[ -n $port ]] || port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# The server's own checks (task, its data, GPUs, the port, every option's range)
# before anything starts: bad input is one line and exit 2, and leaves nothing.
server_command=("$FEDGPU" server --rounds "$rounds" --min-clients "$min" --sampled "$sampled" --port "$port" "${server_args[@]}")
if ! check=$("${server_command[@]}" --check 2>&1 >/dev/null); then
    die_usage "$(printf '%s\n' "$check" | grep -v '^\s*$' | tail -n 1 | sed 's/^fedgpu: error: //')"
fi
# The client nodes' own options (--timeout, --gpus, ...), checked the same way.
mp_flag=--mp
((mp)) || mp_flag=--no-mp
if ! check=$("$FEDGPU" client --check "$mp_flag" --superlink "127.0.0.1:$port" --partition-id 0 --num-partitions "$clients" \
    "${client_args[@]}" 2>&1 >/dev/null); then
    die_usage "$(printf '%s\n' "$check" | grep -v '^\s*$' | tail -n 1 | sed 's/^fedgpu: error: //')"
fi
if ((!force)) && ! check=$("$PY" -m fedgpu.capacity "$clients" "$sampled" $( ((mp)) || echo --no-mp) 2>&1); then
    die_usage "$check"
fi

if [[ -z $run_dir ]]; then
    run_dir=$ROOT/runs/$(date +%Y%m%d-%H%M%S)
    [[ -e $run_dir ]] && run_dir=$run_dir-$$
fi
mkdir -p "$run_dir" 2>/dev/null && [[ -w $run_dir ]] || die_usage "run directory $run_dir is not writable"
run_dir=$(cd "$run_dir" && pwd)

# Every process below carries the run directory: a marker to find them all.
export FEDGPU_RUN_DIR=$run_dir FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1

wait_ready() { # pid timeout: the server says so once its SuperLink answers /health (and nodes' keys are registered)
    local deadline=$((SECONDS + $2))
    while ((SECONDS < deadline)); do
        kill -0 "$1" 2>/dev/null || return 1
        grep -q "SuperLink ready on" "$run_dir/server.log" 2>/dev/null && return 0
        sleep 0.2 & wait $!
    done
    return 1
}

server_failed() { # pid: one line from the server's log, and its exit code
    local code=1
    wait "$1"
    code=$?
    echo "run.sh: server failed (exit $code): $(grep -v '^\s*$' "$run_dir/server.log" | tail -n 1)" >&2
    exit "$code"
}

tls_server_args=()
if ((tls)); then
    certs=$run_dir/certs
    "$ROOT/launchers/make-certs.sh" "$certs" --nodes "$clients" >/dev/null || { echo "run.sh: could not create certificates in $certs" >&2; exit 1; }
    tls_server_args=(--ssl-ca-certfile "$certs/ca.crt" --ssl-certfile "$certs/server.pem" --ssl-keyfile "$certs/server.key"
        --auth-public-keys "$certs/nodes")
fi
tls_client_args() { # i
    ((tls)) && printf '%s\n' --root-certificates "$certs/ca.crt" --auth-private-key "$certs/nodes/node-$1"
}

echo "run.sh: $clients clients, $min to start, $sampled per round, $rounds rounds; run directory $run_dir"
zygote=""
if [[ $isolation == zygote ]]; then
    # One warm zygote for the host: every client node (and the server's own
    # evaluation) forks its children from it. It warms up while the rest start.
    zygote_dir=$(mktemp -d "${TMPDIR:-/tmp}/fedgpu-zygote.XXXXXX") || die_usage "cannot create a private directory for the zygote"
    export FEDGPU_ZYGOTE=$zygote_dir
    setsid "$FEDGPU" zygote --dir "$zygote_dir" --task "$task" --parent-pid $$ >"$run_dir/zygote.log" 2>&1 &
    zygote=$!
    started+=("$zygote")
fi
setsid "${server_command[@]}" "${tls_server_args[@]}" --run-dir "$run_dir" --parent-pid $$ 2>"$run_dir/server.log" &
server=$!
started+=("$server")
wait_ready "$server" "$READY_TIMEOUT" || server_failed "$server"

wait_nodes_registered() { # first last: until those nodes have a SuperNode ID (or died), at most READY_TIMEOUT
    local i deadline=$((SECONDS + READY_TIMEOUT))
    for ((i = $1; i <= $2; i++)); do
        while ((SECONDS < deadline)) && kill -0 "${clients_pids[$i]}" 2>/dev/null &&
            ! grep -q "SuperNode ID" "$run_dir/client-$i.log" 2>/dev/null; do
            sleep 0.2 & wait $!
        done
    done
}

clients_pids=()
# In waves of 4 per core, each registered with the SuperLink before the next
# starts: a hundred interpreters importing Flower at once on a small host starve
# the SuperLink, registrations time out, and Flower's retry of a registration
# that did go through is refused ("public key already in use", exit 305).
wave=$(($(nproc 2>/dev/null || echo 2) * 4))
for ((i = 0; i < clients; i++)); do
    mapfile -t security < <(tls_client_args "$i")
    setsid "$FEDGPU" client "$mp_flag" --superlink "127.0.0.1:$port" --partition-id "$i" --num-partitions "$clients" \
        --parent-pid $$ "${client_args[@]}" "${security[@]}" >"$run_dir/client-$i.log" 2>&1 &
    started+=("$!")
    clients_pids+=("$!")
    if (((i + 1) % wave == 0 && i + 1 < clients)); then
        wait_nodes_registered $((i + 1 - wave)) "$i"
    fi
done
echo "run.sh: server and $clients client nodes started; logs in $run_dir"

# Wait for the server, watching the client nodes: a run cannot finish with
# fewer live nodes than it samples.
while kill -0 "$server" 2>/dev/null; do
    if [[ -n $zygote ]] && ! kill -0 "$zygote" 2>/dev/null; then
        echo "run.sh: the zygote exited: $(grep -v '^\s*$' "$run_dir/zygote.log" | tail -n 1); see $run_dir/zygote.log" >&2
        exit 1
    fi
    alive=0
    for pid in "${clients_pids[@]}"; do kill -0 "$pid" 2>/dev/null && ((alive++)); done
    if ((alive < sampled)); then
        echo "run.sh: only $alive of $clients client nodes are alive, fewer than the $sampled sampled per round; see $run_dir/client-*.log" >&2
        exit 1
    fi
    sleep 0.5 & wait $!
done
wait "$server"
status=$?
((status == 0)) || echo "run.sh: run failed (exit $status); logs in $run_dir: serverapp.log (the ServerApp), server.log" >&2
exit "$status"
