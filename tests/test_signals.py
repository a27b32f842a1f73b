"""SIGINT and SIGTERM to run.sh at the moments not covered in test_launcher: during
set-up, between rounds, during the final evaluation. Everything we started must be
gone within 10 s and the port free (test_launcher: before round 1, mid-training)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from helpers import ROOT, events, free_port, kill_leftovers, start_run_sh, stop_and_check, wait_for

pytestmark = pytest.mark.e2e


def _start(run_dir: Path, port: int, *args: str):
    return start_run_sh([*args, "--port", str(port), "--run-dir", str(run_dir)])


def _give_up(proc, run_dir: Path, what: str) -> None:
    kill_leftovers(run_dir)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"{what} never happened")


def test_sigint_during_set_up_stops_everything(tmp_path: Path) -> None:
    run_dir, port = tmp_path / "run", free_port()
    proc = _start(run_dir, port, "3", "3", "2", "2")
    # The zygote and the server are starting; no client node yet.
    if not wait_for(lambda: (run_dir / "server.log").exists(), timeout=120, interval=0.05):
        _give_up(proc, run_dir, "the server's start")
    assert not (run_dir / "client-0.log").exists()
    stop_and_check(proc, run_dir, port, signal.SIGINT, to_group=True)


def test_sigterm_between_rounds_stops_everything(tmp_path: Path) -> None:
    run_dir, port = tmp_path / "run", free_port()
    proc = _start(run_dir, port, "3", "3", "2", "3")
    if not wait_for(lambda: any(e["event"] == "round-end" for e in events(run_dir)), timeout=240, interval=0.05):
        _give_up(proc, run_dir, "the end of round 1")
    stop_and_check(proc, run_dir, port, signal.SIGTERM, to_group=False)


def test_sigint_during_the_final_evaluation_stops_everything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH",
                       os.pathsep.join([str(ROOT / "tests" / "plugins"), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("FEDGPU_SLOW_SERVER_EVAL", "8")
    run_dir, port = tmp_path / "run", free_port()
    proc = _start(run_dir, port, "2", "2", "2", "1", "--task", "fault_task:FaultyDigits")

    def final_evaluation_running() -> bool:
        seen = events(run_dir)
        started = {e["pid"] for e in seen
                   if e["event"] == "child-start" and e.get("message") == "server-evaluate" and e.get("round") == 1}
        ended = {e["pid"] for e in seen if e["event"] == "child-end"}
        return bool(started - ended)

    if not wait_for(final_evaluation_running, timeout=240, interval=0.05):
        _give_up(proc, run_dir, "the final evaluation")
    stop_and_check(proc, run_dir, port, signal.SIGINT, to_group=True)
