"""``--simulation``: Flower's Simulation Runtime in one host process, every message in a zygote child.

Everything is real: run.sh / ``fedgpu run``, the server, the simulation host
(``python -m fedgpu.flower.simulation``), the zygote and its children, Flower's
ServerApp, InMemoryGrid and LinkState. Runs whose outputs several tests read
are shared (module-scoped fixtures): a 200-client digits run, the stateful
NumPy app (tests/apps/stateful_numpy) and one run with a child fault of every
kind (tests/plugins/fault_task.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest

from helpers import (
    FEDGPU,
    ROOT,
    RUN_SH,
    ProcessSampler,
    ended_output,
    events,
    fault_env,
    free_port,
    kill_leftovers,
    maps_torch,
    pid_alive,
    private_temp,
    read_metrics,
    run_federation,
    run_federation_command,
    start_run_sh,
    stop_and_check,
    wait_for,
)

STATEFUL_APP = ROOT / "tests" / "apps" / "stateful_numpy"
QUICKSTART = ROOT / "examples" / "quickstart-pytorch"
SIMULATION_HOST = "fedgpu.flower.simulation"  # the host's command line: python -m fedgpu.flower.simulation APP_DIR ...


def fedgpu_run(run_dir: Path, *args: str, timeout: float = 420):
    return run_federation_command([str(FEDGPU), "run", *args, "--run-dir", str(run_dir)], run_dir, timeout=timeout)


def host_pid(run_dir: Path) -> int:
    """The simulation host's pid, as it announced itself."""
    (pid,) = {e["pid"] for e in events(run_dir) if e["event"] == "simulation-start"}
    return pid


def report_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "report.json").read_text())


# -- 200 virtual clients of fedgpu's digits task ----------------------------------


class LauncherWatch(threading.Thread):
    """Whether the launcher (run.sh, which becomes `fedgpu run`) ever maps torch; it does not carry the run's marker."""

    def __init__(self, proc: subprocess.Popen) -> None:
        super().__init__(daemon=True)
        self.proc = proc
        self.samples = 0
        self.torch = False

    def run(self) -> None:
        while self.proc.poll() is None:
            mapped = maps_torch(self.proc.pid)
            if mapped is not None:
                self.samples += 1
                self.torch = self.torch or mapped
            time.sleep(0.3)


@pytest.fixture(scope="module")
def big_run(tmp_path_factory: pytest.TempPathFactory):
    run_dir = tmp_path_factory.mktemp("big") / "run"
    sampler = ProcessSampler(run_dir)
    sampler.start()
    proc = subprocess.Popen([str(RUN_SH), "200", "200", "10", "2", "--simulation", "--run-dir", str(run_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    launcher = LauncherWatch(proc)
    launcher.start()
    try:
        output, _ = proc.communicate(timeout=420)
    finally:
        if proc.poll() is None:
            proc.kill()
        sampler.stop()
        launcher.join()
        leftovers = kill_leftovers(run_dir)
    assert not leftovers, f"processes outlived the launcher: {leftovers}"
    return run_dir, proc.returncode, output, sampler, launcher


@pytest.mark.e2e
@pytest.mark.slow
def test_200_virtual_clients_complete_every_message_in_its_own_child(big_run) -> None:
    run_dir, code, output, *_ = big_run
    assert code == 0, output
    assert "simulation of 200 virtual clients for task digits" in output, output
    report = report_of(run_dir)
    assert report["status"] == "completed", report
    host = host_pid(run_dir)
    rounds = report["rounds"]
    assert [r["round"] for r in rounds] == [1, 2], rounds
    messages = [m for r in rounds for m in r["messages"]]
    assert all(len(r["messages"]) == 10 and not r["failed_messages"] for r in rounds), rounds
    # Every message zygote-isolated, in a child of its own; the "node" that ran them all is the host.
    child_pids = [m["child-pid"] for m in messages]
    assert len(set(child_pids)) == len(child_pids) == 20, child_pids
    assert host not in child_pids
    assert {m["node-pid"] for m in messages} == {host}
    assert all(m["isolation"] == "zygote" and m["node-torch-loaded"] is False for m in messages), messages
    assert not any(pid_alive(pid) for pid in child_pids), "children are gone afterwards"
    # 200 virtual nodes, 10 sampled per round: clients from the whole range, none twice in a round.
    for entry in rounds:
        clients = [int(m["client"]) for m in entry["messages"]]
        assert len(set(clients)) == 10 and all(0 <= c < 200 for c in clients), clients
    rows = read_metrics(run_dir)
    assert [(r["round"], r["results"], r["failures"], r["failure_reasons"]) for r in rows] == [
        ("1", "10", "0", ""), ("2", "10", "0", "")
    ], rows
    summary = json.loads((run_dir / "memory.json").read_text())
    assert [entry["round"] for entry in summary["rounds"]] == [1, 2], summary
    assert "[fedgpu] failures: none of 20 messages in 2 rounds" in output, output
    # No client-<i>.log or superlink.log: the virtual clients log into serverapp.log.
    assert not list(run_dir.glob("client-*.log")) and not (run_dir / "superlink.log").exists()
    assert "serverapp.log (the ServerApp and the virtual clients)" in output, output


@pytest.mark.e2e
@pytest.mark.slow
def test_no_torch_in_the_launcher_the_server_or_the_simulation_host(big_run) -> None:
    """fedgpu's own ServerApp never imports torch: only the zygote and its children map it."""
    run_dir, code, output, sampler, launcher = big_run
    assert code == 0, output
    assert launcher.samples >= 3 and not launcher.torch, "the launcher mapped torch"
    host = host_pid(run_dir)
    long_lived = {
        "server": [pid for pid, cmd in sampler.seen.items() if "fedgpu server" in cmd],
        "simulation host": [pid for pid, cmd in sampler.seen.items() if SIMULATION_HOST in cmd],
    }
    assert all(len(pids) == 1 for pids in long_lived.values()), (long_lived, sampler.seen)
    assert long_lived["simulation host"] == [host]
    assert sampler.parent[host] == long_lived["server"][0], "the server started the simulation host"
    mapped = {name: pids for name, pids in long_lived.items() if set(pids) & sampler.torch_pids}
    assert mapped == {}, f"torch mapped in {mapped}"
    # The zygote (whose parent is not of the run: the launcher starts it) maps torch, and so do its children.
    zygotes = [pid for pid, cmd in sampler.seen.items()
               if "fedgpu.isolation.zygote" in cmd and pid in sampler.parent
               and sampler.parent[pid] not in sampler.seen]
    assert len(zygotes) == 1 and zygotes[0] in sampler.torch_pids, (zygotes, sampler.seen)
    child_pids = [m["child-pid"] for r in report_of(run_dir)["rounds"] for m in r["messages"]]
    seen_children = [pid for pid in child_pids if pid in sampler.parent]
    assert seen_children, "the sampler must see some children"
    assert all(sampler.parent[pid] == zygotes[0] for pid in seen_children), "forked by the host's zygote"
    assert any(pid in sampler.torch_pids for pid in seen_children)


@pytest.mark.e2e
def test_an_app_waiting_for_more_nodes_than_the_simulation_has_exits_3_in_one_line(tmp_path: Path) -> None:
    """The app's FedAvg wants 4 nodes; a simulation of 3 never gets more: exit 3 within seconds, not --start-timeout."""
    run_dir = tmp_path / "run"
    started = time.monotonic()
    code, output, _ = fedgpu_run(run_dir, str(STATEFUL_APP), "--simulation", "--nodes", "3")
    assert code == 3, output
    assert ("[fedgpu] run failed: too few nodes: the app's strategy waits for more client nodes "
            "than the 3 connected") in output
    assert time.monotonic() - started < 120, "the default --start-timeout is 300 s: a simulation stops waiting sooner"


# -- a stateful ClientApp: context.state survives from child to child ---------------


@pytest.fixture(scope="module")
def stateful_run(tmp_path_factory: pytest.TempPathFactory):
    run_dir = tmp_path_factory.mktemp("stateful") / "run"
    code, output, _ = fedgpu_run(run_dir, str(STATEFUL_APP), "--simulation", "--nodes", "4")
    return run_dir, code, output


@pytest.mark.e2e
def test_a_stateful_client_app_counts_its_calls_across_children(stateful_run) -> None:
    """Each call counts itself in context.state: 1..6 per node (train and evaluate, 3 rounds), each in a new child."""
    run_dir, code, output = stateful_run
    assert code == 0, output
    # What the ServerApp received, reply by reply (written by the app into its working directory, the run's).
    replies = [json.loads(line) for line in (run_dir / "replies.jsonl").read_text().splitlines()]
    assert len(replies) == 24, replies  # 4 nodes x (train + evaluate) x 3 rounds
    by_partition: dict[int, list[dict]] = defaultdict(list)
    for reply in replies:
        by_partition[reply["partition"]].append(reply)
    assert sorted(by_partition) == [0, 1, 2, 3]
    for partition, seen in by_partition.items():
        seen.sort(key=lambda r: r["calls"])
        # The node's Context came back from every child: its count goes on where the last child left it.
        assert [r["calls"] for r in seen] == [1, 2, 3, 4, 5, 6], (partition, seen)
        assert [(r["type"], r["round"]) for r in seen] == [
            ("train", 1), ("evaluate", 1), ("train", 2), ("evaluate", 2), ("train", 3), ("evaluate", 3)
        ], (partition, seen)
        assert [r["train-calls"] for r in seen if r["type"] == "train"] == [1, 2, 3], seen
        assert [r["evaluate-calls"] for r in seen if r["type"] == "evaluate"] == [1, 2, 3], seen
    # A module global counts the calls made in its process: always 1, every call ran in a process of its own.
    assert {r["calls-in-this-process"] for r in replies} == {1}, replies
    pids = [r["pid"] for r in replies]
    host = host_pid(run_dir)
    assert len(set(pids)) == 24 and host not in pids, (host, pids)
    # fedgpu's report names the same child for each message as the app saw itself run in.
    report = report_of(run_dir)
    assert report["status"] == "completed", report
    stamped = {(m["type"], int(m["client"]), r["round"]): m for r in report["rounds"] for m in r["messages"]}
    assert {key: m["child-pid"] for key, m in stamped.items()} == {
        (r["type"], r["partition"], r["round"]): r["pid"] for r in replies
    }
    assert all(m["isolation"] == "zygote" and m["node-pid"] == host for m in stamped.values()), stamped
    rows = read_metrics(run_dir)
    assert [(r["round"], r["results"], r["failures"]) for r in rows] == [
        ("1", "8", "0"), ("2", "8", "0"), ("3", "8", "0")]
    # FedAvg averaged the counts: every node at the same count, so the average is the count.
    assert [float(r["train_calls"]) for r in rows] == [1.0, 3.0, 5.0], rows


# -- every kind of child fault costs its message, never the run ---------------------

FAULTS = "0=raise,1=segfault,2=sigkill,3=hang,4=exit,5=notmessage,6=setsid"


@pytest.fixture(scope="module")
def fault_run(tmp_path_factory: pytest.TempPathFactory):
    """Round 1: seven of eight clients' first train misbehaves, each its own way; round 2 is normal."""
    base = tmp_path_factory.mktemp("faults")
    run_dir = base / "run"
    with pytest.MonkeyPatch.context() as patch:
        for key, value in fault_env(FAULTS, base).items():
            patch.setenv(key, value)
        # --timeout 15: the hung child's deadline; 4 messages at once, so the hang holds one of them only.
        code, output, _ = run_federation(run_dir, "8", "8", "8", "2", "--simulation", "--workers", "4",
                                         "--task", "fault_task:FaultyDigits", "--timeout", "15")
    return base, run_dir, code, output


@pytest.mark.e2e
@pytest.mark.slow
def test_each_fault_kind_costs_one_message_and_the_next_round_is_normal(fault_run) -> None:
    _, run_dir, code, output = fault_run
    assert code == 0, output
    first, second = read_metrics(run_dir)
    assert (first["results"], first["failures"]) == ("2", "6"), first  # clients 6 (setsid) and 7 answered
    assert sorted(first["failure_reasons"].split("; ")) == [
        "bad reply x1",  # the ClientApp answered a dict, not a Message
        "exit code 3 x1",  # exited without answering
        "killed by SIGKILL x1",
        "killed by SIGSEGV x1",
        "raised ValueError x1",
        "stopped by fedgpu after 15 s x1",
    ], first
    assert (second["results"], second["failures"], second["failure_reasons"]) == ("8", "0", ""), second
    assert float(second["server_accuracy"]) > float(first["server_accuracy"]) - 0.05, (first, second)
    report = report_of(run_dir)
    assert report["status"] == "completed", report
    failed = {f["client"]: f for f in report["rounds"][0]["failed_messages"]}
    assert sorted(failed) == ["0", "1", "2", "3", "4", "5"], failed
    assert failed["0"]["error"].startswith(
        "raised ValueError: injected fault: bad batch (client 0, child pid "), failed["0"]
    assert failed["2"]["error"].startswith(
        "killed by SIGKILL, not by fedgpu (likely the kernel's OOM killer"), failed["2"]
    assert failed["3"]["error"].startswith("stopped by fedgpu after 15 s (client 3, child pid "), failed["3"]
    assert failed["5"]["detail"] == "the ClientApp answered dict, not a Message", failed["5"]
    host = host_pid(run_dir)
    assert all(f["round"] == 1 and f["type"] == "train" for f in failed.values()), failed
    assert all(isinstance(f.get("pid"), int) and f["pid"] != host for c, f in failed.items() if c != "5"), failed
    # The failures summary: by kind, with the round and the client; the logs named are serverapp.log's.
    assert "[fedgpu] failures: 6 of 16 messages, in 1 of 2 rounds" in output, output
    assert "[fedgpu]   killed by SIGSEGV x1: round 1 train client 1" in output, output
    assert "serverapp.log (the ServerApp and the virtual clients)" in output, output
    # A virtual client has no log of its own: serverapp.log has the failure, and where the ClientApp raised.
    log = (run_dir / "serverapp.log").read_text()
    assert "[fedgpu] ClientApp failed: raised ValueError: injected fault: bad batch (client 0" in log, log
    traceback = log[log.index(f"ClientApp traceback (client 0, child pid {failed['0']['pid']}):"):]
    assert "in _misbehave" in traceback and "ValueError: injected fault: bad batch" in traceback, traceback
    assert "Traceback" not in output.split("[fedgpu] failures:")[0], "a task's console shows its round lines only"


@pytest.mark.e2e
def test_a_setsid_grandchild_does_not_survive_its_call(fault_run) -> None:
    base, run_dir, code, output = fault_run
    assert code == 0, output
    grandchild = int((base / "grandchild-6").read_text())
    assert not pid_alive(grandchild), "a grandchild in its own session outlived its call"
    # Its call itself answered: the setsid is not a failure.
    (message,) = [m for m in report_of(run_dir)["rounds"][0]["messages"] if m["client"] == "6"]
    assert message["isolation"] == "zygote", message


# -- Ctrl-C ---------------------------------------------------------------------------


@pytest.mark.e2e
def test_ctrl_c_mid_round_stops_everything_and_reports_the_signal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGINT to the foreground group while client 0's child hangs in round 1: exit 130, nothing left."""
    for key, value in fault_env("0=hang", tmp_path).items():
        monkeypatch.setenv(key, value)
    temp, env = private_temp(tmp_path)
    run_dir = tmp_path / "run"
    proc = start_run_sh(["3", "3", "3", "5", "--simulation", "--task", "fault_task:FaultyDigits",
                         "--run-dir", str(run_dir)],
                        env=env)

    def hanging() -> bool:
        return any(e["event"] == "child-start" and e.get("role") == "client-child" and e.get("client") == 0
                   for e in events(run_dir))

    # A run that ended on its own (it failed) ends the wait too: it is said with its output at once.
    if not wait_for(lambda: hanging() or proc.poll() is not None, timeout=240, interval=0.05) or not hanging():
        kill_leftovers(run_dir)
        with contextlib.suppress(ProcessLookupError):  # run.sh's group may be gone
            os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"client 0's train never started {ended_output(proc)}")
    # No SuperLink in a simulation: any free port passes stop_and_check's port check; the processes are what it checks.
    stop_and_check(proc, run_dir, free_port(), signal.SIGINT, to_group=True, temp=temp)
    report = report_of(run_dir)
    assert report["status"] == "stopped" and report["stopped_by"] == "SIGINT", report
    assert "rounds" in json.loads((run_dir / "memory.json").read_text())


# -- Flower's own quickstart-pytorch ---------------------------------------------------


@pytest.mark.e2e
@pytest.mark.slow
def test_flowers_quickstart_pytorch_under_simulation(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    code, output, sampler = fedgpu_run(run_dir, str(QUICKSTART), "--simulation", "--nodes", "3",
                                       "--run-config", "num-server-rounds=2")
    assert code == 0, output
    report = report_of(run_dir)
    assert report["status"] == "completed" and report["app"]["name"] == "quickstart-pytorch", report
    host = host_pid(run_dir)
    rounds = report["rounds"]
    assert [r["round"] for r in rounds] == [1, 2], rounds
    for entry in rounds:
        # FedAvg: every node trains (fraction-train 1.0), two evaluate (fraction-evaluate 0.5, at least 2).
        assert entry["sent"] == {"train": 3, "evaluate": 2} and not entry["failed_messages"], entry
        assert all(m["isolation"] == "zygote" and m["child-pid"] != host and m["node-pid"] == host
                   for m in entry["messages"]), entry
        # The app's own ServerApp imports torch (it evaluates the global model centrally), and it runs in the
        # simulation host: the host maps torch here, unlike with fedgpu's own ServerApp.
        assert all(m["node-torch-loaded"] is True for m in entry["messages"]), entry
    child_pids = [m["child-pid"] for r in rounds for m in r["messages"]]
    assert len(set(child_pids)) == len(child_pids) == 10, child_pids
    rows = read_metrics(run_dir)
    assert [row["round"] for row in rows] == ["1", "2"], rows
    assert list(rows[0]) == ["round", "train_train_loss", "evaluate_eval_loss", "evaluate_eval_acc", "server_accuracy",
                             "server_loss", "results", "failures", "round_seconds", "failure_reasons"], rows[0]
    assert all((row["results"], row["failures"]) == ("5", "0") for row in rows), rows
    # The app's output is on the console; its file lands in the run directory (the host's working directory).
    assert "Saving final model to disk" in output, output
    assert (run_dir / "final_model.pt").is_file()
    assert "[fedgpu] failures: none of 10 messages in 2 rounds" in output, output
    # fedgpu's launcher and server never mapped torch (the simulation host did: the app's ServerApp is in it).
    ours = [cmd for pid, cmd in sampler.seen.items() if ("fedgpu run" in cmd or "fedgpu server" in cmd)]
    assert ours and not [cmd for pid, cmd in sampler.seen.items()
                         if ("fedgpu run" in cmd or "fedgpu server" in cmd) and pid in sampler.torch_pids], sampler.seen


# -- bad input: exit 2, one line, nothing started -------------------------------------

BAD_INPUT = [
    (["--simulation", "--workers", "0"], "Invalid value for '--workers'"),
    (["--workers", "2"], "--workers is for --simulation"),
    (["--simulation", "--no-mp"], "--no-mp: a simulation runs every message in a child"),
    (["--simulation", "--port", "1234"], "--port is for a SuperLink; a simulation has none"),
    (["--simulation", "--tls"], "--tls is for a SuperLink; a simulation has none"),
]


@pytest.mark.parametrize(("args", "line"), BAD_INPUT, ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_simulation_options_are_one_line_and_exit_2(tmp_path: Path, args: list[str], line: str) -> None:
    run_dir = tmp_path / "run"
    for argv, prefix in (([str(RUN_SH), "2", "2", "1", "1", *args], "run.sh: "),
                         ([str(FEDGPU), "run", "--nodes", "2", *args], "fedgpu: ")):
        done = subprocess.run([*argv, "--run-dir", str(run_dir)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(prefix) and line in lines[0], done.stderr
        assert not run_dir.exists(), "nothing is created for bad input"


# -- GPUs: placement and admission decide, as for client nodes ------------------------


@pytest.mark.e2e
def test_gpu_placement_and_admission_decide_in_a_simulation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake NVML (tests/fake_gpu), one 1000 MiB GPU, children of 400 MiB, 4 workers: two fit, the others wait."""
    from helpers import FAKE_GPU_DIR

    nvml_dir = tmp_path / "nvml"
    nvml_dir.mkdir()
    (nvml_dir / "gpus.json").write_text(json.dumps([{"total_mib": 1000, "name": "Fake 1G"}]))
    monkeypatch.setenv("FAKE_NVML_DIR", str(nvml_dir))
    monkeypatch.setenv("FAKE_GPU_MIB", "400")
    monkeypatch.setenv("FAKE_GPU_TRAIN_TOGETHER", "2")  # two admitted children meet and hold their memory
    monkeypatch.setenv("FAKE_GPU_HOLD_S", "2")
    monkeypatch.setenv("FEDGPU_LEDGER", str(tmp_path / "ledger"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(FAKE_GPU_DIR), os.environ.get("PYTHONPATH", "")]))
    run_dir = tmp_path / "run"
    code, output, _ = run_federation(run_dir, "4", "4", "4", "2", "--simulation", "--workers", "4",
                                     "--task", "fake_gpu_task:FakeGpuDigits", "--gpu-mem", "400")
    assert code == 0, output
    rows = read_metrics(run_dir)
    assert all((r["results"], r["failures"]) == ("4", "0") for r in rows), rows  # no OOM: the excess waited
    summary = json.loads((run_dir / "memory.json").read_text())
    assert summary["gpu_available"] and summary["admission"]["waits"] >= 2, summary["admission"]
    for entry in summary["rounds"]:
        assert entry["gpu"]["peak_holders"] <= 2, entry["gpu"]  # never more than fit
        assert (entry["gpu"]["at_rest_ours_mib"], entry["gpu"]["at_rest_holders"]) == (0.0, 0), entry["gpu"]
    messages = [m for r in report_of(run_dir)["rounds"] for m in r["messages"]]
    assert len(messages) == 8 and all(m["gpu"] == 0 and m["child-gpu-peak-mib"] == 400 for m in messages), messages
