"""Faults in a real federation: children that raise, segfault, are SIGKILLed or hang.

The task (tests/plugins/fault_task.py) is digits whose first training call on
chosen partitions misbehaves; everything else is the real run.sh federation.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import fault_env, pid_alive, read_metrics, run_federation

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # whole runs


@pytest.fixture
def faulty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def plan(faults: str) -> str:
        for key, value in fault_env(faults, tmp_path).items():
            monkeypatch.setenv(key, value)
        return "fault_task:FaultyDigits"

    return plan


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One run shared by the two tests below: ten nodes, the first train of nine misbehaving, one per way.

    Nodes 0-3: the child raises, segfaults, is SIGKILLed, hangs past --timeout; nodes 4-8: it replies
    badly (a wrong shape, one array too many, one too few, a NaN, zero examples); node 9 is healthy.
    """
    tmp_path = tmp_path_factory.mktemp("faulty")
    with pytest.MonkeyPatch.context() as patch:
        for key, value in fault_env("0=raise,1=segfault,2=sigkill,3=hang,4=badshape,5=extra,6=missing,7=nan,8=zero",
                                    tmp_path).items():
            patch.setenv(key, value)
        run_dir = tmp_path / "run"
        code, output, _ = run_federation(run_dir, "10", "10", "10", "2", "--task", "fault_task:FaultyDigits",
                                         "--timeout", "15")
    assert code == 0, output
    return run_dir, output


def test_failed_children_are_counted_with_their_reason_and_the_next_round_is_normal(faulty_run) -> None:
    run_dir, output = faulty_run
    first, second = read_metrics(run_dir)
    assert (first["results"], first["failures"]) == ("1", "9"), first
    assert sorted(first["failure_reasons"].split("; ")) == [
        "bad reply x5", "killed by SIGKILL x1", "killed by SIGSEGV x1", "raised ValueError x1",
        "stopped by fedgpu after 15 s x1"
    ], first
    assert (second["results"], second["failures"], second["failure_reasons"]) == ("10", "0", ""), second
    assert float(second["server_accuracy"]) > float(first["server_accuracy"]) - 0.05
    # The end-of-run summary: by kind, with the round, the client and its log.
    assert "[fedgpu] failures: 9 of 20 messages, in 1 of 2 rounds" in output, output
    assert f"raised ValueError x1: round 1 train client 0 ({run_dir / 'client-0.log'})" in output, output
    assert f"killed by SIGSEGV x1: round 1 train client 1 ({run_dir / 'client-1.log'})" in output, output
    assert "ValueError: injected fault: bad batch" in (run_dir / "client-0.log").read_text()
    failed = {f["client"]: f for f in json.loads((run_dir / "report.json").read_text())["rounds"][0]["failed_messages"]}
    # Who ended the child is said: fedgpu for the timeout, something else for the SIGKILL.
    assert failed["2"]["error"].startswith(
        "killed by SIGKILL, not by fedgpu (likely the kernel's OOM killer"), failed["2"]
    assert failed["3"]["error"].startswith("stopped by fedgpu after 15 s (client 3, child pid "), failed["3"]
    assert all(isinstance(failed[c]["pid"], int) and failed[c]["round"] == 1 for c in "0123"), failed


def test_bad_replies_cost_one_message_each_and_the_round_aggregates_the_rest(faulty_run) -> None:
    """Wrong shapes, one array too many or too few, a NaN, zero examples: each is one failure."""
    run_dir, output = faulty_run
    first, second = read_metrics(run_dir)
    assert first["failure_reasons"].count("bad reply x5") == 1, first
    assert (second["results"], second["failures"]) == ("10", "0"), second
    assert float(second["server_accuracy"]) > 0.5, second  # the one good reply and round 2 trained the model
    failed = {f["client"]: f for f in json.loads((run_dir / "report.json").read_text())["rounds"][0]["failed_messages"]}
    assert failed["4"]["detail"] == "array '0.weight' has shape (3, 3), expected (16, 1, 3, 3)", failed["4"]
    assert failed["5"]["detail"] == "9 arrays, expected 8: unexpected array 'extra-8'", failed["5"]
    assert failed["6"]["detail"] == "7 arrays, expected 8: array '8.bias' is missing", failed["6"]
    assert failed["7"]["detail"] == "array '0.weight' has non-finite values (NaN or inf)", failed["7"]
    assert failed["8"]["detail"] == "'num-examples' is 0, expected a positive integer", failed["8"]
    assert failed["4"]["error"] == "bad reply: array '0.weight' has shape (3, 3), expected (16, 1, 3, 3) (client 4)"
    assert f"bad reply x5: round 1 train client 4 ({run_dir / 'client-4.log'})" in output, output


def test_stopped_looping_children_are_stopped_by_the_deadline_and_nothing_they_started_survives(
    faulty, tmp_path: Path
) -> None:
    """No --timeout: the message timeout bounds every child; a setsid() grandchild dies with its call."""
    task = faulty("0=sigstop,1=loop,2=setsid")
    run_dir = tmp_path / "run"
    # The run waits 30 s for replies; children get 30 s less the margin for the failure reply (5 s).
    code, output, _ = run_federation(run_dir, "3", "3", "3", "2", "--task", task, "--message-timeout", "30")
    assert code == 0, output
    first, second = read_metrics(run_dir)
    assert (first["results"], first["failures"], first["failure_reasons"]) == (
        "1", "2", "stopped by fedgpu after 25 s x2"
    ), first
    assert (second["results"], second["failures"]) == ("3", "0"), second  # the same nodes serve round 2
    grandchild = int((tmp_path / "grandchild-2").read_text())
    assert not pid_alive(grandchild), "a grandchild in its own session outlived its call"


def test_a_server_app_that_fails_says_why_on_the_console_and_names_its_log(faulty, tmp_path: Path, monkeypatch) -> None:
    task = faulty("")
    monkeypatch.setenv("FEDGPU_SERVER_EVAL_FAULT", "raise")  # the server's evaluation of the initial model raises
    run_dir = tmp_path / "run"
    code, output, _ = run_federation(run_dir, "2", "2", "2", "2", "--task", task)
    assert code == 1, output
    line = (
        "[fedgpu] run failed: the ServerApp's child raised OSError: injected fault: the test split is unreadable "
        f"(traceback in {run_dir / 'serverapp.log'})"
    )
    assert line in output, output
    assert "OSError: injected fault" in (run_dir / "serverapp.log").read_text()
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "failed" and report["failure"]["kind"] == "ServerApp raised", report
