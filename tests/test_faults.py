"""Faults in a real federation: children that raise, segfault, are SIGKILLed or hang.

The task (tests/plugins/fault_task.py) is digits whose first training call on
chosen partitions misbehaves; everything else is the real run.sh federation.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import ROOT
from test_federation import read_metrics, run_federation

PLUGINS = ROOT / "tests" / "plugins"


@pytest.fixture
def faulty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def plan(faults: str) -> str:
        monkeypatch.setenv("FEDGPU_FAULTS", faults)
        monkeypatch.setenv("FEDGPU_FAULTS_DIR", str(tmp_path))
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(PLUGINS), os.environ.get("PYTHONPATH", "")]))
        return "fault_task:FaultyDigits"

    return plan


def test_failed_children_are_counted_with_their_reason_and_the_next_round_is_normal(faulty, tmp_path: Path) -> None:
    task = faulty("0=raise,1=segfault,2=sigkill,3=hang")
    run_dir = tmp_path / "run"
    code, output, _ = run_federation(run_dir, "5", "5", "5", "2", "--task", task, "--timeout", "15")
    assert code == 0, output
    first, second = read_metrics(run_dir)
    assert (first["results"], first["failures"]) == ("1", "4"), first
    assert sorted(first["failure_reasons"].split("; ")) == [
        "killed by SIGKILL x1", "killed by SIGSEGV x1", "raised ValueError x1", "timeout after 15 s x1"
    ], first
    assert (second["results"], second["failures"], second["failure_reasons"]) == ("5", "0", ""), second
    assert float(second["server_accuracy"]) > float(first["server_accuracy"]) - 0.05
    # The end-of-run summary: by kind, with the round, the client and its log.
    assert "[fedgpu] failures: 4 of 10 messages, in 1 of 2 rounds" in output, output
    assert f"raised ValueError x1: round 1 train client 0 ({run_dir / 'client-0.log'})" in output, output
    assert f"killed by SIGSEGV x1: round 1 train client 1 ({run_dir / 'client-1.log'})" in output, output
    assert "ValueError: injected fault: bad batch" in (run_dir / "client-0.log").read_text()
