"""A Flower app's run from start to end: every node up before round 1, an honest exit status, a complete report
when it is stopped, and one line on the console for each way it can end badly.

The app (tests/apps/life_numpy) is NumPy only, so a run costs little; its run
config picks how it misbehaves. Everything else is real: the SuperLink, the
zygote, the client nodes, `flwr run`, the reports.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
from pathlib import Path

import pytest

from helpers import (
    FEDGPU,
    ROOT,
    RUN_SH,
    free_port,
    kill_leftovers,
    read_or_empty,
    run_federation_command,
    stop_and_check,
    wait_for,
)

APP = ROOT / "tests" / "apps" / "life_numpy"
SAMPLED = re.compile(r"configure_(train|evaluate): Sampled (\d+) nodes \(out of (\d+)\)")


def fedgpu_run(run_dir: Path, *args: str, timeout: float = 300) -> tuple[int, str]:
    """`fedgpu run` of the app to its end; nothing of the run may outlive it."""
    code, output, _ = run_federation_command([str(FEDGPU), "run", str(APP), *args, "--run-dir", str(run_dir)], run_dir,
                                             timeout=timeout)
    return code, output


def console_lines(output: str, start: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith(start)]


@pytest.mark.e2e
@pytest.mark.slow
def test_ten_nodes_are_all_up_before_round_1_and_one_failing_node_is_said_in_one_line(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    code, output = fedgpu_run(run_dir, "--nodes", "10", "--run-config", "fail-partition=3")
    assert code == 0, output
    # Flower's FedAvg samples every node it sees (fraction-train 1.0): all ten, in round 1 too.
    sampled = SAMPLED.findall((run_dir / "serverapp.log").read_text())
    assert sampled == [("train", "10", "10"), ("train", "10", "10")], sampled
    assert "[fedgpu] run completed, but 2 of 20 messages failed; outputs in" in output, output
    assert f"raised ValueError x2: round 1 train client 3 ({run_dir / 'client-3.log'})" in output, output
    # The failures' fields stay in serverapp.log; the console has the summary.
    assert "fedgpu-failure:" not in output, output
    assert "fedgpu-failure:" in (run_dir / "serverapp.log").read_text()


@pytest.mark.e2e
def test_a_server_whose_nodes_never_register_submits_nothing_and_exits_3(tmp_path: Path) -> None:
    """`fedgpu server --wait-nodes 2` with no node at all: one line after --start-timeout, no run submitted."""
    run_dir, port = tmp_path / "run", free_port()
    done = subprocess.run(
        [str(FEDGPU), "server", "--app", str(APP), "--wait-nodes", "2", "--start-timeout", "5", "--port", str(port),
         "--run-dir", str(run_dir)],
        env={**os.environ, "FEDGPU_RUN_DIR": str(run_dir)}, capture_output=True, text=True, timeout=240,
    )
    left = kill_leftovers(run_dir)
    assert done.returncode == 3, done.stdout + done.stderr
    assert console_lines(done.stdout, "[fedgpu] run failed:") == [
        "[fedgpu] run failed: only 0 of 2 client nodes registered within 5 s"], done.stdout
    assert not (run_dir / "serverapp.log").exists()  # `flwr run` never ran
    assert json.loads((run_dir / "report.json").read_text())["failure"]["detail"].startswith("only 0 of 2")
    assert not left, left


@pytest.mark.e2e
def test_a_run_whose_every_message_failed_exits_4_with_the_summary(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    code, output = fedgpu_run(run_dir, "--nodes", "2", "--run-config", "fail-partition=-2 num-server-rounds=1")
    assert code == 4, output
    assert "[fedgpu] failures: 2 of 2 messages, in 1 of 1 rounds" in output, output
    assert "[fedgpu] run failed: every one of its 2 messages failed (exit 4)" in output, output
    assert "fedgpu-failure:" not in output, output
    # Flower calls the run completed; report.json says what the exit code says.
    report = json.loads((run_dir / "report.json").read_text())
    assert report["flower_status"] == "finished:completed", report
    assert report["status"] == "failed" and report["failure"]["exit_code"] == 4, report


@pytest.mark.e2e
def test_one_node_for_a_strategy_that_waits_for_two_ends_the_run_with_exit_3(tmp_path: Path) -> None:
    """FedAvg's default minimum is 2 nodes; with one started, Flower would wait for ever."""
    run_dir = tmp_path / "run"
    code, output = fedgpu_run(run_dir, "--nodes", "1", "--start-timeout", "15", "--run-config", "min-nodes=2",
                              timeout=240)
    assert code == 3, output
    (line,) = console_lines(output, "[fedgpu] run failed:")
    assert "waits for more client nodes than the 1 connected" in line and "give --nodes N, or lower its minimum" in line
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "failed" and line.endswith(report["failure"]["detail"]), report


@pytest.mark.e2e
def test_term_mid_run_leaves_a_complete_report_of_the_rounds_that_ran(tmp_path: Path) -> None:
    run_dir, port = tmp_path / "run", free_port()
    proc = subprocess.Popen(
        [str(RUN_SH), "2", "--app", str(APP), "--run-config", "num-server-rounds=1000", "--port", str(port),
         "--run-dir", str(run_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    # Round 2 under way: round 1 ended.
    if not wait_for(lambda: "[ROUND 2/1000]" in read_or_empty(run_dir / "serverapp.log"), timeout=300, interval=0.05):
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("round 2 never started")
    stop_and_check(proc, run_dir, port, signal.SIGTERM, to_group=False)
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "stopped" and report["stopped_by"] == "SIGTERM", report
    assert "failure" not in report, report
    assert report["rounds"][0]["round"] == 1 and report["rounds"][0]["results"] == 2, report["rounds"][0]
    memory = json.loads((run_dir / "memory.json").read_text())
    assert [entry["round"] for entry in memory["rounds"]][:1] == [1], memory["rounds"]
    assert (run_dir / "memory.png").stat().st_size > 0


@pytest.mark.e2e
def test_a_server_app_that_raises_leaves_its_error_in_report_json(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    code, output = fedgpu_run(run_dir, "--nodes", "1", "--run-config", 'server-mode="raise"')
    assert code == 1, output
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "failed", report
    assert report["failure"] == {"kind": "ServerApp failed",
                                 "detail": "RuntimeError: injected: the ServerApp cannot start"}, report


@pytest.mark.e2e
def test_a_server_app_that_never_returns_is_ended_by_the_run_timeout(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    code, output = fedgpu_run(run_dir, "--nodes", "1", "--run-timeout", "10", "--run-config", 'server-mode="hang"',
                              timeout=240)
    assert code == 5, output
    assert console_lines(output, "[fedgpu] run failed:") == [
        "[fedgpu] run failed: the run took longer than --run-timeout 10 s; stopped"], output
    assert json.loads((run_dir / "report.json").read_text())["status"] == "failed"


def _small_files() -> None:
    """In the launched process: no file may grow past 15 kB; a write past it fails with EFBIG, as on a full disk."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the writer
    resource.setrlimit(resource.RLIMIT_FSIZE, (15_000, 15_000))


@pytest.mark.e2e
def test_a_run_directory_that_cannot_grow_is_named_on_the_console(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    try:
        done = subprocess.run([str(FEDGPU), "run", str(APP), "--nodes", "2", "--run-config", "num-server-rounds=1000",
                               "--run-dir", str(run_dir)], capture_output=True, text=True, timeout=300,
                              preexec_fn=_small_files)
    finally:
        left = kill_leftovers(run_dir)
    assert not left, left
    code, output = done.returncode, done.stdout + done.stderr
    assert code == 1, output
    # One line names the file and the error (which file meets the limit first varies).
    found = re.findall(rf"^\[fedgpu\] run failed: cannot write {re.escape(str(run_dir))}/\S+: File too large$",
                       output, re.MULTILINE)
    assert len(found) == 1, output
    assert "Traceback" not in output, output


@pytest.mark.parametrize("value, problem", [
    ("nan", "'nan' is not a finite number of seconds"), ("inf", "'inf' is not a finite number of seconds"),
    ("0", "0.0 is not in the range x>0"), ("-3", "-3.0 is not in the range x>0"),
])
def test_a_run_timeout_not_finite_and_positive_is_refused(tmp_path: Path, value: str, problem: str) -> None:
    for command in (["run", str(APP)], ["server", "--app", str(APP)]):
        argv = [str(FEDGPU), *command, "--run-timeout", value, "--check", "--run-dir", str(tmp_path / "r")]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done
        (line,) = done.stderr.splitlines()
        assert line.startswith("fedgpu: error: Invalid value for '--run-timeout': ") and problem in line, line
        assert not (tmp_path / "r").exists()


def test_a_waiting_loop_is_told_from_a_server_app_at_work() -> None:
    """The watch on ``grid.get_node_ids()`` in a user's ServerApp: only polls that see no new node, with nothing
    sent and no long pause between them, count; a real grid class, a clock of the test's own."""
    from flwr.superlink.grid.http_grid import HttpGrid

    from fedgpu.flower.internals import NODES_POLL_GAP_SECONDS, NodeWaitWatch, WaitingForNodes, node_wait_contract

    assert node_wait_contract(HttpGrid) == []
    now = [0.0]
    watch = NodeWaitWatch(30.0, clock=lambda: now[0])
    for _ in range(29):  # Flower's sample_nodes: a poll a second
        watch.polled(1)
        now[0] += 1.0
    watch.sent()  # a message sent: the strategy is at work
    for _ in range(29):
        watch.polled(1)
        now[0] += 1.0
    watch.polled(2)  # a node came: the count starts again
    now[0] += NODES_POLL_GAP_SECONDS + 1  # a long pause (the ServerApp's own work) is no waiting loop
    for _ in range(30):
        watch.polled(2)
        now[0] += 1.0
    with pytest.raises(WaitingForNodes, match="more client nodes than the 2 connected, and none came within 30 s"):
        watch.polled(2)


def test_a_stopped_tasks_report_names_the_signal(tmp_path: Path) -> None:
    """fedgpu's own ServerApp sees a signal only as its end ("stopped by KeyboardInterrupt"); the server knows which."""
    from fedgpu.flower.recorder import RunRecorder
    from fedgpu.flower.run_reports import mark_ended

    recorder = RunRecorder(tmp_path, {"num-rounds": 3})
    recorder.fail("stopped", "stopped by KeyboardInterrupt")
    said: list[str] = []
    mark_ended(tmp_path, said.append, stopped_by="SIGINT")
    report = json.loads((tmp_path / "report.json").read_text())
    assert (report["status"], report["stopped_by"], "failure" in report, said) == ("stopped", "SIGINT", False, [])
