"""The pace of Flower's loops (fedgpu.flower.internals): the contract with Flower, the doorbell, end to end."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import threading
from pathlib import Path

import pytest

from fedgpu.flower.internals import (
    Doorbells,
    NodePace,
    grid_contract,
    loop_contract,
    object_pull_contract,
    sleep_contract,
)

from helpers import FEDGPU, kill_leftovers, read_or_empty


def test_the_installed_flower_has_the_loops_fedgpu_paces() -> None:
    """Fails for a Flower whose loops changed shape: update fedgpu.flower.internals, do not run slower unnoticed."""
    from flwr.superlink.grid import http_grid
    from flwr.supernode import start_client_internal

    assert loop_contract(start_client_internal) == []
    assert grid_contract(http_grid) == []
    assert object_pull_contract() == []


def _module_from(path: Path, source: str):
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_loop_of_another_shape_is_named(tmp_path: Path) -> None:
    changed = _module_from(tmp_path / "changed_loop.py", (
        "import time\n"
        "def start_client_internal():\n"
        "    while True:\n"
        "        time.sleep(1)\n"  # Flower's 3 s became 1 s
        "        _push_messages()\n"
        "def _push_messages():\n"
        "    time.sleep(0.5)\n"
        "    t = time.monotonic()\n"
    ))
    problems = loop_contract(changed)
    assert len(problems) == 3, problems
    assert "('start_client_internal', 1)" in problems[0] and "yield_object_contents" in problems[0]
    assert "time.monotonic" in problems[1]
    assert "no longer loops pull" in problems[2]
    assert sleep_contract(changed, (("start_client_internal", 1), ("_push_messages", 0.5)), {"monotonic"}) == []


def test_without_a_doorbell_the_idle_interval_starts_fast_and_backs_off() -> None:
    pace = NodePace(None)  # a node on another host than its ServerApp: nobody rings
    after = []
    for _ in range(3):
        assert pace.idle(0.4, node_id=42) is False
        after.append(pace._idle_wait)
    assert after == [0.2, 0.4, 0.4], after  # 0.1 s, then twice the last, up to Flower's interval
    pace.awaiting_reply(0.01)  # a message: the next idle pull is fast again
    assert pace._idle_wait == 0.1


@pytest.mark.parametrize("where", ["short", "long"])
def test_a_ring_ends_an_idle_wait_and_the_bell_goes_with_the_node(tmp_path: Path, where: str) -> None:
    if where == "long":  # a bell's path beyond a Unix address's 107 bytes (a long $TMPDIR)
        tmp_path = tmp_path / ("d" * 120)
        tmp_path.mkdir()
    pace = NodePace(str(tmp_path))
    try:
        assert pace.idle(0.05, node_id=42) is False  # nobody rang: Flower's interval (here 0.05 s) passes
        assert (tmp_path / "42").exists()
        # Rings (as the ServerApp sends them) end the next wait, however long; one wake for both.
        bells = Doorbells(str(tmp_path))
        assert bells.ring(42) and bells.ring(42)
        assert not bells.ring(7)  # no node 7 here: nothing happens
        assert pace.idle(3600, node_id=42) is True
        assert pace.idle(0.05, node_id=42) is False
        assert (pace.idle_waits, pace.rings) == (3, 1)
    finally:
        pace.close()
    assert not (tmp_path / "42").exists()


def test_awaiting_a_reply_wakes_the_runner_and_returns_when_the_reply_is_stored() -> None:
    pace = NodePace()
    waiting = threading.Thread(target=pace.awaiting_reply, args=(3600,))
    waiting.start()
    assert pace.task_stored.wait(60)
    pace.reply_pushed()
    waiting.join(60)
    assert not waiting.is_alive() and not pace.reply_stored.is_set()


@pytest.mark.e2e
@pytest.mark.slow
def test_a_run_wakes_its_nodes_through_their_doorbells(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    try:
        done = subprocess.run([str(FEDGPU), "run", "2", "2", "2", "2", "--run-dir", str(run_dir)],
                              capture_output=True, text=True, timeout=900)
    finally:
        kill_leftovers(run_dir)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    for i in range(2):
        log = read_or_empty(run_dir / f"client-{i}.log")
        found = re.search(r"SuperNode loop: (\d+) idle waits, (\d+) ended by the doorbell \(doorbell (\S+)\)", log)
        assert found, log[-2000:]
        # Two rounds of training (and nothing else sent to clients): each message rang.
        assert int(found[2]) >= 2, found[0]
        assert not Path(found[3].rstrip(")")).exists()  # the bell is removed with the node
    superlink = read_or_empty(run_dir / "superlink.log")
    assert "Traceback" not in superlink, superlink[-2000:]


@pytest.mark.e2e
@pytest.mark.slow
def test_flowers_pace_is_kept_when_asked(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = {**os.environ, "FEDGPU_NODE_PACE": "flower"}
    try:
        done = subprocess.run([str(FEDGPU), "run", "2", "2", "1", "1", "--run-dir", str(run_dir)],
                              capture_output=True, text=True, timeout=900, env=env)
    finally:
        kill_leftovers(run_dir)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    log = read_or_empty(run_dir / "client-0.log")
    assert "FEDGPU_NODE_PACE=flower: the SuperNode keeps Flower's own pace" in log, log[-2000:]
    assert "SuperNode loop:" not in log


def test_the_installed_flower_has_the_simulation_runtime_fedgpu_changes() -> None:
    """Fails for a Flower whose Simulation Runtime changed shape (backend, dispatcher, grid pace, _run_simulation)."""
    from fedgpu.flower.internals.simulation import simulation_contract

    assert simulation_contract() == []


def test_the_simulation_dispatcher_hands_a_node_one_message_at_a_time() -> None:
    """A node's next message waits for its reply (its Context is never computed twice at once); others go on."""
    import threading

    from fedgpu.flower.internals.simulation import StoredMessages

    stored = StoredMessages()
    assert stored.take(0.01) == []
    stored.stored(7)
    stored.stored(7)  # a second message for node 7 before the first was taken
    stored.stored(3)
    assert stored.take(0.01) == [3, 7]
    stored.dispatched(7)
    stored.stored(7)  # node 7's next message: it is busy
    stored.stored(5)
    assert stored.take(0.01) == [5]
    assert stored.take(0.01) == []
    woken = []
    waiter = threading.Thread(target=lambda: woken.append(stored.take(5.0)))
    waiter.start()
    stored.replied(7)  # its reply is stored: its next message may go, and the waiting dispatcher wakes
    waiter.join(5.0)
    assert woken == [[7]]


def test_the_installed_flower_has_every_name_the_boundary_uses() -> None:
    """Every non-public Flower name fedgpu.flower.internals imports (its one list) imports from this Flower."""
    from fedgpu.flower.internals.contract import missing_flower_names

    assert missing_flower_names() == []
