#!/usr/bin/env bash
# Run this app on Flower's deployment runtime, on 127.0.0.1 only, with no network:
# one SuperLink, two SuperNodes (Flower's default subprocess isolation), then `flwr run`.
#
#   ./run.sh [RESULT_FILE]        (default: $WORK_DIR/result.json)
#
# Environment: WORK_DIR (logs, Flower homes, result; default: a new temp dir),
# RUN_TIMEOUT (seconds, default 600). Exits 0 only if the run's status is
# finished:completed. Ctrl-C, TERM or any exit stops every process it started.
set -uo pipefail

GRACE_SECONDS=5
READY_TIMEOUT=60
CONNECTION=isolate-example

started=() # leaders of the process groups (sessions) started here
stopping=0

# Every process started below inherits this fresh marker, including those Flower
# starts in sessions of their own (the SuperLink's SuperExec) and fedgpu's isolated
# children, which the process-group kills below do not reach.
export ISOLATE_EXAMPLE_RUN="$$-$RANDOM$RANDOM$RANDOM"

marked_pids() { # live processes carrying our marker, this shell excepted
    local f pid line want="ISOLATE_EXAMPLE_RUN=$ISOLATE_EXAMPLE_RUN"
    for f in /proc/[0-9]*/environ; do
        pid=${f#/proc/}
        pid=${pid%/environ}
        [[ $pid == "$$" || $pid == "$BASHPID" ]] && continue
        while IFS= read -r -d '' line; do
            [[ $line == "$want" ]] && { echo "$pid"; break; }
        done 2>/dev/null <"$f"
    done 2>/dev/null
}

stop_all() {
    local pid deadline left
    for pid in "${started[@]}"; do kill -TERM -- "-$pid" 2>/dev/null; done
    for pid in $(marked_pids); do kill -TERM "$pid" 2>/dev/null; done
    deadline=$((SECONDS + GRACE_SECONDS))
    while ((SECONDS < deadline)); do
        left=$(marked_pids)
        [[ -z $left ]] && break
        sleep 0.1
    done
    for pid in "${started[@]}"; do kill -KILL -- "-$pid" 2>/dev/null; done
    for pid in $(marked_pids); do kill -KILL "$pid" 2>/dev/null; done
    wait 2>/dev/null # reap: a zombie parent keeps Flower's children waiting
    started=()
}

on_exit() {
    local code=$?
    stop_all
    # The Flower homes hold installed copies of the app; logs and the result stay.
    [[ -n ${WORK_DIR:-} ]] && rm -rf "$WORK_DIR/flwr-homes"
    exit "$code"
}

on_signal() {
    ((stopping)) && return
    stopping=1
    echo "run.sh: $1 received, stopping" >&2
    exit $((128 + $2)) # runs on_exit
}

# Installed before anything starts.
trap on_exit EXIT
trap 'on_signal SIGINT 2' INT
trap 'on_signal SIGTERM 15' TERM

fail() {
    echo "run.sh: $*" >&2
    exit 1
}

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VENV_BIN="$HERE/../../.venv/bin"
if [[ -x $VENV_BIN/python ]]; then
    VENV_BIN=$(cd "$VENV_BIN" && pwd)
    export PATH="$VENV_BIN:$PATH" # Flower starts its helpers (flower-superexec, ...) by name
    PY=$VENV_BIN/python
else
    PY=$(command -v python3 || command -v python) || fail "no python found"
fi
for tool in setsid flwr flower-superlink flower-supernode; do
    command -v "$tool" >/dev/null || fail "$tool not found (install fedgpu and flwr, or create $HERE/../../.venv)"
done

WORK_DIR=${WORK_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/isolate-clientapp.XXXXXX")}
mkdir -p "$WORK_DIR" && WORK_DIR=$(cd "$WORK_DIR" && pwd) || fail "cannot create $WORK_DIR"
RESULT_FILE=${1:-$WORK_DIR/result.json}
mkdir -p "$(dirname "$RESULT_FILE")" && RESULT_FILE=$(cd "$(dirname "$RESULT_FILE")" && pwd)/$(basename "$RESULT_FILE")
rm -f "$RESULT_FILE"
homes=$WORK_DIR/flwr-homes
mkdir -p "$homes/cli" "$homes/superlink" "$homes/node-0" "$homes/node-1"

export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

# Free ports, all chosen now: the SuperLink's, and each SuperNode's own runtime API port.
read -r LINK_PORT NODE0_PORT NODE1_PORT < <("$PY" -c '
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
') || fail "cannot pick free ports"

printf '[superlink.%s]\naddress = "127.0.0.1:%s"\ninsecure = true\n' "$CONNECTION" "$LINK_PORT" >"$homes/cli/config.toml"

echo "run.sh: work directory $WORK_DIR (logs, result); SuperLink on 127.0.0.1:$LINK_PORT"
FLWR_HOME=$homes/superlink setsid flower-superlink --insecure --host 127.0.0.1 --port "$LINK_PORT" \
    --disable-runtime-dependency-installation </dev/null >"$WORK_DIR/superlink.log" 2>&1 &
superlink=$!
started+=("$superlink")

deadline=$((SECONDS + READY_TIMEOUT))
until "$PY" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)' \
    "http://127.0.0.1:$LINK_PORT/health" 2>/dev/null; do
    kill -0 "$superlink" 2>/dev/null || fail "SuperLink exited while starting; see $WORK_DIR/superlink.log"
    ((SECONDS < deadline)) || fail "SuperLink not ready after ${READY_TIMEOUT}s; see $WORK_DIR/superlink.log"
    sleep 0.2
done

nodes=()
for i in 0 1; do
    port_var=NODE${i}_PORT
    FLWR_HOME=$homes/node-$i setsid flower-supernode --insecure --superlink "127.0.0.1:$LINK_PORT" \
        --port "${!port_var}" --node-config "partition-id=$i num-partitions=2" \
        </dev/null >"$WORK_DIR/supernode-$i.log" 2>&1 &
    nodes+=("$!")
    started+=("$!")
done
echo "run.sh: SuperLink ready, 2 SuperNodes started; submitting the run"

# flwr run streams the ServerApp's log here; the FedAvg strategy waits for both nodes.
run_config="result-file=$("$PY" -c 'import json, sys; print(json.dumps(sys.argv[1]))' "$RESULT_FILE")"
FLWR_HOME=$homes/cli setsid flwr run "$HERE" "$CONNECTION" --stream --run-config "$run_config" </dev/null &
submit=$!
started+=("$submit")

deadline=$((SECONDS + ${RUN_TIMEOUT:-600}))
while kill -0 "$submit" 2>/dev/null; do
    kill -0 "$superlink" 2>/dev/null || fail "the SuperLink died; see $WORK_DIR/superlink.log"
    for i in 0 1; do
        kill -0 "${nodes[$i]}" 2>/dev/null || fail "SuperNode $i died; see $WORK_DIR/supernode-$i.log"
    done
    ((SECONDS < deadline)) || fail "the run did not finish within ${RUN_TIMEOUT:-600}s"
    sleep 0.5 &
    wait $!
done
wait "$submit" || echo "run.sh: flwr run exited with code $?" >&2

# flwr run exits 0 even when the run failed: ask the SuperLink.
listing=$(FLWR_HOME=$homes/cli flwr ls "$CONNECTION" --format json 2>&1)
status=$("$PY" -c '
import json, sys
try:
    runs = json.loads(sys.argv[1]).get("runs", [])
except ValueError:
    runs = []
print(runs[-1].get("status", "unknown") if runs else "unknown")
' "$listing")
echo "run.sh: run status $status"
[[ $status == finished:completed ]] || fail "the run did not complete (flwr ls: $listing); logs in $WORK_DIR"
[[ -f $RESULT_FILE ]] && echo "run.sh: metrics in $RESULT_FILE"
exit 0
