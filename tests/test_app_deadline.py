"""A user's ClientApp that never returns: its child is stopped at the message's deadline, which is bounded even
where the app's messages live Flower's default 12 hours, and it costs that one message, not the run."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from flwr.app import Context, Message, RecordDict

from fedgpu.flower.runner import APP_MESSAGE_SECONDS, message_deadline

from helpers import FEDGPU, ROOT, cleaned_up, events, pid_alive, processes_with_env, wait_for

HANG_APP = ROOT / "tests" / "apps" / "small_hang"
# Long enough for Flower's CLI to be asked twice while client 0 hangs, on a loaded host too.
DEADLINE = 30


def _context(run_config: dict) -> Context:
    return Context(run_id=7, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config=run_config)


def test_an_apps_message_has_a_bounded_deadline_whatever_its_ttl(in_a_run) -> None:
    # As a user's strategy sends it: Flower's default TTL, 12 hours.
    message = Message(RecordDict(), dst_node_id=1, message_type="train")
    assert message.metadata.ttl > 10 * APP_MESSAGE_SECONDS
    app_config = _context({"num-server-rounds": 3})
    assert message_deadline(message, app_config, None) == APP_MESSAGE_SECONDS <= 600
    # The node's --timeout still rules, shorter or longer.
    assert message_deadline(message, app_config, 5.0) == 5.0
    assert message_deadline(message, app_config, 3600.0) == 3600.0
    # A task run's own message timeout is what it says, less the reply's margin, as before.
    assert message_deadline(message, _context({"message-timeout": 1200.0}), None) == 1170.0


def _flwr(flwr_home: str, *args: str) -> subprocess.CompletedProcess:
    """Flower's own CLI, as a user runs it beside a fedgpu run (its flwr, the run's Flower home)."""
    env = {**os.environ, "FLWR_HOME": flwr_home}
    return subprocess.run([str(FEDGPU.parent / "flwr"), *args], capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.e2e
def test_a_hung_client_app_is_stopped_at_its_deadline_and_costs_one_message(tmp_path: Path) -> None:
    """Client 0's ClientApp never returns. While it hangs, Flower's CLI reaches the run as the console says;
    at the node's --timeout its child is stopped, and the round aggregates client 1's reply."""
    app = tmp_path / "app"
    shutil.copytree(HANG_APP, app, ignore=shutil.ignore_patterns("__pycache__"))
    run_dir = tmp_path / "run"
    console = tmp_path / "console.txt"
    with open(console, "w") as out:
        proc = subprocess.Popen(
            [str(FEDGPU), "run", str(app), "--nodes", "2", "--timeout", str(DEADLINE), "--run-dir", str(run_dir)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    with cleaned_up(proc, run_dir):
        hung = lambda: [e["pid"] for e in events(run_dir) if e["event"] == "child-start" and e.get("client") == 0]  # noqa: E731
        assert wait_for(hung, timeout=300, interval=0.2), console.read_text()
        # The console's one line on Flower's CLI, and its commands, while the run is in its hung round.
        said = re.search(r"\[fedgpu\] Flower's CLI: FLWR_HOME=(\S+) flwr ls fedgpu "
                         r"\(or: flwr log RUN_ID fedgpu --show\)", console.read_text())
        assert said and said.group(1) == str(run_dir / "flwr-home"), console.read_text()
        listed = _flwr(said.group(1), "ls", "fedgpu", "--format", "json")
        assert listed.returncode == 0, listed.stdout + listed.stderr
        (run,) = json.loads(listed.stdout)["runs"]
        assert run["status"] == "running" and run["fab-name"] == "small-hang", run
        logged = _flwr(said.group(1), "log", run["run-id"], "fedgpu", "--show")
        assert logged.returncode == 0 and "[ROUND 1/1]" in logged.stdout, logged.stdout + logged.stderr
        code = proc.wait(timeout=300)
        assert wait_for(lambda: not processes_with_env("FEDGPU_RUN_DIR", str(run_dir)), timeout=10), "left running"
    output = console.read_text()
    assert code == 0, output
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "completed", report
    (entry,) = report["rounds"]
    (failed,) = entry["failed_messages"]
    kind = f"stopped by fedgpu after {DEADLINE} s"
    assert (failed["kind"], failed["client"], failed["type"]) == (kind, "0", "train"), failed
    assert [(m["type"], m["client"]) for m in entry["messages"]] == [("train", "1")], entry
    assert f"{kind} x1: round 1 train client 0" in output, output
    # The hung child ran its deadline (the node's log gives it), and is gone.
    assert f"(deadline {DEADLINE} s)" in (run_dir / "client-0.log").read_text()
    starts = {e["pid"]: e["t"] for e in events(run_dir) if e["event"] == "child-start" and e.get("client") == 0}
    ends = {e["pid"]: e["t"] for e in events(run_dir) if e["event"] == "child-end" and e.get("client") == 0}
    (pid,) = starts
    assert DEADLINE <= ends[pid] - starts[pid] < DEADLINE + 60, (starts, ends)
    assert not pid_alive(pid)
