"""examples/isolate-clientapp: a user's own ClientApp isolated with ``@isolate()``.

The example runs for real on Flower's deployment runtime (SuperLink, two
SuperNodes, ``flwr run``) on 127.0.0.1; every process it starts inherits a
unique EXAMPLE_MARKER, so "nothing left behind" is checked by scanning
/proc/*/environ for it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from helpers import kill_processes_with_env, parent_pid, processes_with_env, wait_for

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "isolate-clientapp"
RUN_SH = EXAMPLE / "run.sh"
RUN_TIMEOUT = 240

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux (/proc, setsid)"),
    pytest.mark.skipif(shutil.which("setsid") is None, reason="needs setsid (util-linux)"),
]


def _marked(marker: str, *also: str) -> dict[int, str]:
    """Processes started by the example run with this marker (pid -> command line)."""
    return processes_with_env("EXAMPLE_MARKER", marker, *also)


def _isolated_children(marker: str) -> list[int]:
    """Children running a call: forked by a zygote (their parent is one), or spawned with the call's variable."""
    marked = _marked(marker)
    zygotes = {pid for pid, command in marked.items() if "fedgpu.isolation.zygote" in command}
    spawned = _marked(marker, "FEDGPU_ISOLATED_CALL=1")
    return [pid for pid in marked if parent_pid(pid) in zygotes or pid in spawned]


def _leftovers(marker: str, settle: float = 3.0) -> list[str]:
    """Marked processes still alive ``settle`` seconds after the example exited."""
    wait_for(lambda: not _marked(marker), settle, interval=0.1)
    # Short: Flower passes run tokens on the command line.
    return [f"{pid}: {command[:160]}" for pid, command in _marked(marker).items()]


def _stop(proc: subprocess.Popen) -> None:
    """TERM run.sh (its trap stops what it started), then KILL if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _start(tmp_path: Path, marker: str) -> tuple[subprocess.Popen, Path, Path]:
    log = tmp_path / "run.out"
    result = tmp_path / "result.json"
    env = {**os.environ, "EXAMPLE_MARKER": marker, "WORK_DIR": str(tmp_path / "work"), "RUN_TIMEOUT": str(RUN_TIMEOUT)}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(RUN_SH), str(result)], cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL
        )
    return proc, log, result


def _per_node(metrics: dict, key: str) -> list[int]:
    value = metrics[key]
    assert isinstance(value, list), f"{key} should be a per-node list, got {value!r}"
    return [int(v) for v in value]


def test_host_process_never_imports_torch() -> None:
    """Calling the decorated train() runs torch in children only; state comes back."""
    script = r"""
import json, os, sys
sys.path.insert(0, sys.argv[1])
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
TaskIdentity.task_id = TaskIdentity.run_id = TaskIdentity.node_id = 1  # as flwr-clientapp sets them
from isolated_app import client_app, task
content = RecordDict({"arrays": ArrayRecord(task.initial_arrays(0)),
    "config": ConfigRecord({"server-round": 1, "lr": 0.1, "local-epochs": 1, "batch-size": 32})})
msg = Message(content=content, dst_node_id=1, message_type="train")
ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 1, "num-partitions": 2}, state=RecordDict(),
              run_config={"seed": 0})
replies = [dict(client_app.train(msg, ctx).content["metrics"]) for _ in range(2)]
print(json.dumps({"host": os.getpid(), "torch": "torch" in sys.modules, "replies": replies,
                  "state": dict(ctx.state["example"]), "module": client_app.__name__,
                  "preload": list(client_app.PRELOAD)}))
"""
    env = {k: v for k, v in os.environ.items() if k != "FEDGPU_ISOLATED_CALL"}
    done = subprocess.run(
        [sys.executable, "-c", script, str(EXAMPLE)], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    assert facts["torch"] is False, "the process hosting the ClientApp imported torch"
    pids = [reply["pid"] for reply in facts["replies"]]
    assert len(set(pids)) == 2 and facts["host"] not in pids, facts
    assert all(reply["isolated"] == 1 and reply["num-examples"] > 0 for reply in facts["replies"]), facts
    # context.state written in the child came back: the second call saw the first one's count.
    assert [reply["train-calls"] for reply in facts["replies"]] == [1, 2]
    assert facts["state"] == {"train-calls": 2}
    # The private zygote says what it warmed up with: the preloads, the decorated functions' module by its
    # name, then what torch would load lazily in each child.
    ready = [line for line in done.stdout.splitlines() if re.search(r"\[fedgpu\] zygote \d+ ready", line)]
    warm_ups = ", ".join([*facts["preload"], facts["module"], "fedgpu.flower.warm_ups:import_torch_lazy_modules"])
    assert len(ready) == 1 and ready[0].endswith(f"(warm-ups: {warm_ups})"), done.stdout


@pytest.mark.e2e
@pytest.mark.slow
def test_example_runs_on_flower_deployment_runtime(tmp_path: Path) -> None:
    marker = f"fedgpu-test-{uuid.uuid4()}"
    started = time.monotonic()
    proc, log, result_file = _start(tmp_path, marker)
    try:
        try:
            proc.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            _stop(proc)
            pytest.fail(f"run.sh did not finish within {RUN_TIMEOUT}s:\n{log.read_text(errors='replace')[-4000:]}")
        seconds = time.monotonic() - started
        output = log.read_text(errors="replace")
        left = _leftovers(marker)
        assert proc.returncode == 0, f"run.sh exited {proc.returncode} after {seconds:.0f}s:\n{output[-4000:]}"
        assert "run status finished:completed" in output
        assert not left, "processes started by the example outlived it:\n" + "\n".join(left)
    finally:
        kill_processes_with_env("EXAMPLE_MARKER", marker)

    result = json.loads(result_file.read_text())
    assert result["status"] == "completed" and result["num_rounds"] == 2
    assert result["final_accuracy"] > 0.5, result
    assert result["final_accuracy"] > result["initial_accuracy"], result
    assert result["serverapp_imported_torch"] is False

    train = result["train_metrics_clientapp"]
    evaluate = result["evaluate_metrics_clientapp"]
    assert sorted(train) == sorted(evaluate) == ["1", "2"]
    train_pids = [pid for r in ("1", "2") for pid in _per_node(train[r], "pid")]
    evaluate_pids = [pid for r in ("1", "2") for pid in _per_node(evaluate[r], "pid")]
    # Every train reply came from its own short-lived child.
    assert len(train_pids) == 4 and len(set(train_pids)) == 4, train
    assert not set(train_pids) & set(evaluate_pids), (train, evaluate)
    for r in ("1", "2"):
        assert _per_node(train[r], "partition-id") == [0, 1]
        assert _per_node(train[r], "isolated") == [1, 1]
        assert _per_node(evaluate[r], "isolated") == [1, 1]
        # context.state made it back from each child to the SuperNode and into the next call.
        assert _per_node(train[r], "train-calls") == [int(r), int(r)]
    assert result["evaluate_metrics_clientapp"]["2"]["accuracy"] > 0.5


@pytest.mark.e2e
def test_example_stops_everything_on_sigterm(tmp_path: Path) -> None:
    """TERM while a client's isolated child is training: nothing may outlive run.sh."""
    marker = f"fedgpu-test-{uuid.uuid4()}"
    proc, log, _ = _start(tmp_path, marker)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while not _isolated_children(marker):
            if proc.poll() is not None or time.monotonic() > deadline:
                _stop(proc)
                pytest.fail(f"no isolated child appeared:\n{log.read_text(errors='replace')[-4000:]}")
            time.sleep(0.1)
        assert len(_marked(marker)) >= 5  # SuperLink, SuperExecs, SuperNodes, flwr-clientapp, child, ...
        stopped = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            _stop(proc)
            pytest.fail("run.sh did not stop within 30s of SIGTERM")
        took = time.monotonic() - stopped
        left = _leftovers(marker)
        assert proc.returncode == 128 + signal.SIGTERM, log.read_text(errors="replace")[-3000:]
        assert not left, f"outlived run.sh ({took:.1f}s to stop):\n" + "\n".join(left)
        assert "SIGTERM received" in log.read_text(errors="replace")
    finally:
        kill_processes_with_env("EXAMPLE_MARKER", marker)


@pytest.mark.e2e
@pytest.mark.slow
def test_example_runs_in_the_simulation_engine_every_call_in_a_child(tmp_path: Path) -> None:
    """Flower's Simulation Engine (Ray actors): @isolate() forks each call from the actor's zygote."""
    marker = f"fedgpu-test-{uuid.uuid4()}"
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "local-sim"\n\n[superlink.local-sim]\naddress = ":local:"\noptions.num-supernodes = 2\n'
    )
    result_file = tmp_path / "result.json"
    env = {**os.environ, "EXAMPLE_MARKER": marker, "FLWR_HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("FEDGPU_ZYGOTE", None)
    try:
        try:
            done = subprocess.run(
                ["flwr", "run", str(EXAMPLE), "local-sim", "--stream", "--run-config", f'result-file="{result_file}"'],
                env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT, cwd=tmp_path,
            )
        except subprocess.TimeoutExpired as late:
            said = (late.stdout or b"").decode(errors="replace") + (late.stderr or b"").decode(errors="replace")
            pytest.fail(f"flwr run took over {RUN_TIMEOUT}s; its last lines:\n{said[-4000:]}")
        listing = subprocess.run(["flwr", "ls", "local-sim", "--format", "json"], env=env, capture_output=True,
                                 text=True, timeout=120, cwd=tmp_path)
    finally:
        kill_processes_with_env("EXAMPLE_MARKER", marker)  # `:local:` leaves its SuperLink running: ours to stop
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert json.loads(listing.stdout)["runs"][-1]["status"] == "finished:completed", listing.stdout
    result = json.loads(result_file.read_text())
    train = result["train_metrics_clientapp"]
    pids = [pid for r in ("1", "2") for pid in _per_node(train[r], "pid")]
    assert len(set(pids)) == 4, train  # a child per call, in the Simulation Engine's actors too
    assert all(_per_node(train[r], "isolated") == [1, 1] for r in ("1", "2")), train
    assert result["final_accuracy"] > result["initial_accuracy"], result
