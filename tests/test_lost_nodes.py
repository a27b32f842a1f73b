"""Client nodes and servers that die: the run goes on or fails honestly, nothing lingers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers import (
    FEDGPU,
    cleaned_up,
    events,
    free_port,
    kill_leftovers,
    pid_alive,
    processes_with_env,
    read_metrics,
    read_or_empty,
    start_run_sh,
    wait_for,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # each waits out a start timeout or a lost node


def test_server_killed_every_client_node_exits_non_zero_with_a_clear_line(tmp_path: Path) -> None:
    run_dir, port = tmp_path / "run", free_port()
    run_dir.mkdir()
    env = {**os.environ, "FEDGPU_RUN_DIR": str(run_dir)}
    server = subprocess.Popen(
        [str(FEDGPU), "server", "--rounds", "3", "--min-clients", "3", "--sampled", "2", "--port", str(port),
         "--run-dir", str(run_dir)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    logs = [run_dir / f"client-{i}.log" for i in range(2)]
    try:
        assert wait_for(lambda: _listening(port), timeout=120)
        nodes = [
            subprocess.Popen(
                [str(FEDGPU), "client", "--mp", "--isolation", "spawn", "--superlink", f"127.0.0.1:{port}",
                 "--partition-id", str(i), "--num-partitions", "3", "--max-wait-time", "6"],
                env=env, stdout=open(logs[i], "w"), stderr=subprocess.STDOUT,  # noqa: SIM115 - lives as long as the node
            )
            for i in range(2)
        ]
        # Registered, and waiting for a round that needs a third node: the server dies first.
        assert wait_for(lambda: all("SuperNode ID" in read_or_empty(log) for log in logs), timeout=120)
        os.killpg(server.pid, signal.SIGKILL)
        killed = time.monotonic()
        for node in nodes:
            node.wait(timeout=60)
        took = time.monotonic() - killed
    finally:
        leftovers = kill_leftovers(run_dir)
    assert [node.returncode for node in nodes] == [3, 3]
    assert took < 6 + 5 + 15, took  # patience + one probe interval + shutdown
    for log in logs:
        assert f"the SuperLink at 127.0.0.1:{port} has been unreachable for" in read_or_empty(log)
    assert not [cmd for cmd in leftovers if "fedgpu client" in cmd], leftovers


def test_a_node_killed_mid_run_the_others_finish_the_run(tmp_path: Path) -> None:
    run_dir, port = tmp_path / "run", free_port()
    proc = start_run_sh(["4", "4", "3", "2", "--message-timeout", "30", "--port", str(port), "--run-dir", str(run_dir)])
    with cleaned_up(proc, run_dir):
        # A node whose child is training in round 1: it was sampled, its reply will never come.
        def training_node() -> int | None:
            seen = events(run_dir)
            nodes = {e["client"]: e["pid"] for e in seen if e["event"] == "node-start"}
            clients = [e["client"] for e in seen if e["event"] == "child-start" and e.get("role") == "client-child"]
            return nodes.get(clients[0]) if clients else None

        assert wait_for(lambda: training_node() is not None, timeout=240, interval=0.05)
        os.killpg(training_node(), signal.SIGKILL)
        out, err = proc.communicate(timeout=300)
        nothing_left = wait_for(lambda: not processes_with_env("FEDGPU_RUN_DIR", str(run_dir)), 5)
    assert proc.returncode == 0, out + err
    assert nothing_left, "processes of the run outlived run.sh"
    rows = read_metrics(run_dir)
    assert len(rows) == 2 and int(rows[0]["results"]) == 2 and int(rows[-1]["results"]) >= 2, rows
    failed = [f for r in json.loads((run_dir / "report.json").read_text())["rounds"] for f in r["failed_messages"]]
    # Which of these it is depends on timing: the round's wait, the message's TTL, the node's heartbeat.
    no_reply = {"no reply within 30.0 s", "no reply (the message expired, or its node left)", "node unavailable"}
    assert 1 <= len(failed) <= 2 and all(f["kind"] in no_reply for f in failed), failed
    assert "[fedgpu] failures: " in out


def test_too_few_nodes_left_fails_the_run_with_a_clear_message(tmp_path: Path) -> None:
    run_dir, port = tmp_path / "run", free_port()
    proc = start_run_sh(["4", "4", "3", "3", "--port", str(port), "--run-dir", str(run_dir)])
    try:
        assert wait_for(lambda: len([e for e in events(run_dir) if e["event"] == "node-start"]) == 4, timeout=240)
        for node in [e["pid"] for e in events(run_dir) if e["event"] == "node-start"][:2]:
            os.killpg(node, signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
    finally:
        leftovers = kill_leftovers(run_dir)
    assert proc.returncode == 1
    assert "run.sh: only 2 of 4 client nodes are alive, fewer than the 3 sampled per round" in err, err
    assert not leftovers, leftovers


def _listening(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def test_a_server_without_enough_nodes_gives_up_after_the_start_timeout(tmp_path: Path) -> None:
    run_dir, port = tmp_path / "run", free_port()
    run_dir.mkdir()
    env = {**os.environ, "FEDGPU_RUN_DIR": str(run_dir)}
    started = time.monotonic()
    done = subprocess.run(
        [str(FEDGPU), "server", "--rounds", "2", "--min-clients", "2", "--sampled", "2", "--start-timeout", "8",
         "--port", str(port), "--run-dir", str(run_dir)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    took = time.monotonic() - started
    leftovers = kill_leftovers(run_dir)
    assert done.returncode == 3, done.stdout + done.stderr
    assert "[fedgpu] run failed: only 0 of 2 client nodes registered within 8 s" in done.stdout, done.stdout
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "failed" and report["failure"]["kind"] == "too few nodes", report
    assert not leftovers, leftovers
    assert took < 200, took


def test_a_node_that_dies_before_round_1_fails_the_run_after_the_start_timeout(tmp_path: Path) -> None:
    """Three nodes to start, one dies before it registers: no waiting forever, exit 3, nothing left."""
    run_dir, port = tmp_path / "run", free_port()
    proc = start_run_sh(["3", "3", "2", "1", "--start-timeout", "20", "--port", str(port), "--run-dir", str(run_dir)])
    with cleaned_up(proc, run_dir):
        def node_2() -> list[int]:
            return [pid for pid, cmd in processes_with_env("FEDGPU_RUN_DIR", str(run_dir)).items()
                    if "fedgpu client" in cmd and "--partition-id 2 " in cmd]

        assert wait_for(node_2, timeout=120, interval=0.05), "client node 2 never started"
        assert "SuperNode ID" not in read_or_empty(run_dir / "client-2.log")
        for pid in node_2():
            os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 3, out + err
        assert "[fedgpu] run failed: only 2 of 3 client nodes registered within 20 s" in out, out + err
        assert wait_for(lambda: not processes_with_env("FEDGPU_RUN_DIR", str(run_dir)), timeout=15)


def test_a_sigkilled_server_leaves_no_superlink_behind(tmp_path: Path) -> None:
    """The SuperLink dies with its server through --parent-pid (no preexec_fn), even when only the server is killed."""
    run_dir, port = tmp_path / "run", free_port()
    run_dir.mkdir()
    env = {**os.environ, "FEDGPU_RUN_DIR": str(run_dir)}
    server = subprocess.Popen(
        [str(FEDGPU), "server", "--rounds", "1", "--min-clients", "1", "--port", str(port), "--run-dir", str(run_dir)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )

    def superlinks() -> dict[int, str]:
        return {pid: cmd for pid, cmd in processes_with_env("FEDGPU_RUN_DIR", str(run_dir)).items()
                if "fedgpu.flower.internals superlink" in cmd}

    try:
        assert wait_for(lambda: _listening(port) and superlinks(), timeout=120)
        [(superlink, command)] = superlinks().items()
        assert f"--parent-pid {server.pid} " in command, command
        os.kill(server.pid, signal.SIGKILL)  # the server alone: its process group (and the SuperLink) stays
        server.wait(timeout=10)
        assert wait_for(lambda: not pid_alive(superlink), timeout=15), command
        assert wait_for(lambda: not _listening(port), timeout=15)
    finally:
        leftovers = kill_leftovers(run_dir)
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
    assert not [cmd for cmd in leftovers if "superlink" in cmd], leftovers
