"""Only the owner reaches a run: another uid submits nothing, steals no task, and one port holds one run.

The end-to-end test runs as root (as CI does) and acts as ``nobody`` with the
system's Python; elsewhere it is skipped with the reason.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from fedgpu.owner_only import OwnerOnly, refusal, tcp_peer_uid

from helpers import (
    FEDGPU,
    Gate,
    free_port,
    kill_leftovers,
    processes_with_env,
    read_metrics,
    read_or_empty,
    wait_for,
)
from other_uid import OtherUser, other_user


@pytest.fixture(scope="module")
def intruder(tmp_path_factory: pytest.TempPathFactory) -> OtherUser:
    return other_user(tmp_path_factory)


def listening_ports(pids: list[int]) -> list[int]:
    ports = []
    for pid in pids:
        try:
            ports += [c.laddr.port for c in psutil.Process(pid).net_connections(kind="tcp")
                      if c.status == psutil.CONN_LISTEN]
        except psutil.Error:
            pass
    return ports


def node_pids(run_dir: Path) -> list[int]:
    return [pid for pid, cmd in processes_with_env("FEDGPU_RUN_DIR", str(run_dir)).items() if " client " in cmd]


def start(run_dir: Path, port: int, rounds: int, env: dict[str, str], *options: str) -> subprocess.Popen:
    return subprocess.Popen([str(FEDGPU), "run", "2", "2", "2", str(rounds), "--port", str(port),
                             "--run-dir", str(run_dir), *options],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)


@pytest.mark.e2e
@pytest.mark.slow
def test_the_owner_alone_reaches_a_run(tmp_path: Path, intruder: OtherUser) -> None:
    """Another uid's `flwr run`, task acquisition and Fleet calls are refused and cost the run nothing;
    of two runs started at once on one port one runs and the other exits 2; nothing is left in the temporary
    folder, not even by a launcher killed with SIGKILL."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp)}
    port = free_port()
    # A run whose launcher is killed with SIGKILL: its nodes, server and zygote die with it; its private
    # directory stays, and the next run removes it.
    killed_dir = tmp_path / "killed"
    killed = start(killed_dir, port, 50, env)
    try:
        assert wait_for(lambda: "SuperNode ID" in read_or_empty(killed_dir / "client-1.log"), 180), (
            read_or_empty(killed_dir / "server.log"))
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait(10)
        wait_for(lambda: not processes_with_env("FEDGPU_RUN_DIR", str(killed_dir)), 30)
    finally:
        kill_leftovers(killed_dir)
    left_by_kill = sorted(p.name for p in temp.glob("fedgpu-*"))
    assert left_by_kill, "a launcher killed with SIGKILL left no private directory: nothing to sweep"

    # Client 0's first training waits at a gate the test opens once the intruder is done: the run surely goes on
    # while it tries.
    gate = Gate(tmp_path / "gate")
    runs = {name: start(tmp_path / name, port, 2, gate.env(env), "--task", "fault_task:FaultyDigits")
            for name in ("a", "b")}
    try:
        assert wait_for(lambda: any(run.poll() is not None for run in runs.values()), 180), (
            "neither run stopped at the port")
        loser_name = next(name for name, run in runs.items() if run.poll() is not None)
        winner_name = "b" if loser_name == "a" else "a"
        loser, winner, run_dir = runs[loser_name], runs[winner_name], tmp_path / winner_name
        loser_err = loser.stderr.read()
        assert loser.returncode == 2, loser_err
        assert f"port {port} on 127.0.0.1 is in use" in loser_err, loser_err
        assert winner.poll() is None, winner.stderr.read()
        assert gate.reached(180), read_or_empty(run_dir / "server.log")
        ports = listening_ports(node_pids(run_dir))
        assert len(ports) == 2, ports

        marker = intruder.home / "marker"
        submitted = intruder.submit(port, marker)
        stolen = intruder.run([str(intruder.home / "app" / "steal_tasks.py"), *map(str, ports)])
        pulled = [intruder.post(f"http://127.0.0.1:{p}/v1/runtime/pull-task-input") for p in ports]
        fleet = intruder.post(f"http://127.0.0.1:{port}/v1/fleet/pull-messages")
        control = intruder.post(f"http://127.0.0.1:{port}/v1/control/list-runs")
        alive_after_intruder = winner.poll() is None
        gate.open()
        out, err = winner.communicate(timeout=420)
    finally:
        for name in runs:
            kill_leftovers(tmp_path / name)
        for run in runs.values():
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
    assert alive_after_intruder, "the run ended before the intruder was done: the test proved nothing"
    assert winner.returncode == 0, out + err
    assert not marker.exists(), marker.read_text()
    assert submitted.returncode != 0 and "answers only its owner's processes" in submitted.stderr, (
        submitted.stdout + submitted.stderr)
    attempts = json.loads(stolen.stdout.strip().splitlines()[-1]) if stolen.returncode == 0 else stolen.stderr
    assert isinstance(attempts, dict) and len(attempts) == 2, attempts
    assert all(result.startswith("refused") and ("403" in result or "owner" in result)
               for result in attempts.values()), attempts
    assert (fleet, control, pulled) == ("403", "403", ["403", "403"])
    # No message was lost to the intruder: every round had both replies.
    assert [(int(r["results"]), int(r["failures"])) for r in read_metrics(run_dir)] == [(2, 0)] * 2
    assert "failures: none of 4 messages in 2 rounds" in out, out
    # Outputs are the owner's alone.
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    files = [p for p in run_dir.rglob("*") if p.is_file() and not p.is_symlink()]
    assert files and all(stat.S_IMODE(p.stat().st_mode) & 0o077 == 0 for p in files), \
        [(str(p), oct(p.stat().st_mode)) for p in files if p.stat().st_mode & 0o077]
    # The killed run's directory was swept by the runs after it; theirs went with them.
    assert not list(temp.glob("fedgpu-*")), sorted(p.name for p in temp.iterdir())


def test_other_hosts_reach_the_fleet_api_only() -> None:
    """A peer with no socket on this host is another host: Fleet and health only; a local peer by its uid."""
    with socket.create_server(("127.0.0.1", 0)) as server, socket.create_connection(server.getsockname()):
        accepted, peer = server.accept()
        with accepted:
            local = accepted.getsockname()
            assert tcp_peer_uid(peer, local) == os.geteuid()
            assert tcp_peer_uid(("192.0.2.7", peer[1]), local) is None  # TEST-NET-1: never on this host

            def scope(path: str, client_address: tuple[str, int]) -> dict:
                return {"type": "http", "path": path, "client": client_address, "server": local}

            fleet = ("/v1/fleet/", "/health")
            assert refusal(scope("/v1/control/start-run", peer), fleet, os.geteuid()) == ""
            # a local socket of another uid
            assert refusal(scope("/v1/control/start-run", peer), fleet, os.geteuid() + 1) != ""
            remote = ("192.0.2.7", 40000)
            assert refusal(scope("/v1/fleet/pull-messages", remote), fleet, os.geteuid()) == ""
            assert refusal(scope("/health", remote), fleet, os.geteuid()) == ""
            for path in ("/v1/control/start-run", "/v1/runtime/acquire-task", "/docs"):
                assert "own host" in refusal(scope(path, remote), fleet, os.geteuid()), path
            assert refusal({"type": "http", "path": "/health"}, fleet, os.geteuid()) != ""  # no peer: nobody vouches


def test_a_guarded_server_answers_its_owner_with_the_run_token(tmp_path: Path) -> None:
    """OwnerOnly in front of a real HTTP server: the owner gets the answer and the token, over real sockets."""
    import threading

    import uvicorn

    async def app(scope, receive, send):  # a minimal ASGI app
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    guarded = OwnerOnly(app, token="t0ken")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(guarded, host="127.0.0.1", port=port, log_level="error", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        assert wait_for(lambda: server.started, 30)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/anything", timeout=10) as answer:
            assert answer.read() == b"ok" and answer.headers["x-fedgpu-run"] == "t0ken"
        assert guarded.refused == 0
    finally:
        server.should_exit = True
        thread.join(10)
