"""The zygote: a real zygote process, real forks, a real Unix socket; no mocks."""

from __future__ import annotations

import contextlib
import json
import os
import random
import select
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fedgpu.isolation import Isolator
from fedgpu.isolation.zygote import KEY_NAME, READY_NAME, SOCKET_NAME, ZygoteUntrusted, connect, read_key

from helpers import FEDGPU, parent_pid, pid_alive, read_or_empty

SCRIPTS_DIR = Path(__file__).resolve().parent / "isolation_scripts"


def start_zygote(directory: Path, *warm_ups: str, log: Path | None = None) -> subprocess.Popen:
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [sys.executable, "-m", "fedgpu.isolation.zygote", "--dir", str(directory),
         "--parent-pid", str(os.getpid()), *warm_ups],
        stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(SCRIPTS_DIR)},
    )


def wait_ready(directory: Path, proc: subprocess.Popen, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while not (directory / READY_NAME).exists():
        assert proc.poll() is None, f"zygote exited with {proc.returncode}"
        assert time.monotonic() < deadline, "zygote not ready"
        time.sleep(0.05)
    return int((directory / READY_NAME).read_text())


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    """A zygote warmed like a federation's (torch and the digits task): (dir, pid, log)."""
    directory = tmp_path_factory.mktemp("zygote")
    os.chmod(directory, 0o700)
    log = directory.parent / "zygote.log"
    proc = start_zygote(directory, "torch", "fedgpu.tasks.work:warm_up=digits", log=log)
    pid = wait_ready(directory, proc)
    yield directory, pid, log
    proc.terminate()
    assert proc.wait(10) == 128 + signal.SIGTERM  # it cleans up, then exits
    assert not (directory / SOCKET_NAME).exists() and not (directory / KEY_NAME).exists()


# --- functions that run in children ----------------------------------------------


def _torch_state() -> dict:
    torch_was_loaded = "torch" in sys.modules  # before this call imported anything
    import torch

    return {
        "torch_was_loaded": torch_was_loaded,
        "dynamo_was_loaded": "torch._dynamo" in sys.modules,
        "cuda_initialized": torch.cuda.is_initialized(),
        "threads": len(os.listdir("/proc/self/task")),
    }


def _random_draws() -> tuple:
    import torch

    return random.random(), float(np.random.random()), float(torch.rand(1))


# --- tests -----------------------------------------------------------------------


def test_zygote_files_are_private_and_a_caller_without_the_key_is_refused(zygote):
    directory, _, _ = zygote
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((directory / SOCKET_NAME).stat().st_mode) == 0o600
    assert stat.S_IMODE((directory / KEY_NAME).stat().st_mode) == 0o600
    key = read_key(str(directory))
    for wrong in (b"\0" * 32, key[:-1] + b"!"):
        # The zygote proves it knows the key first: with the wrong one, we take it for an impostor.
        with pytest.raises(ZygoteUntrusted, match="does not know the zygote's key"):
            connect(str(directory), wrong)
    # A caller that gives a wrong proof is hung up on; a garbage hello too.
    for proof in (b"\0" * 32, None):
        with socket.socket(socket.AF_UNIX) as raw:
            raw.settimeout(10)
            raw.connect(str(directory / SOCKET_NAME))
            if proof is None:
                raw.sendall(b"GET / HTTP/1.0\r\n" * 3)
            else:
                raw.sendall(b"FGZ1" + os.urandom(32))
                assert len(raw.recv(64)) == 64  # the zygote's nonce and proof
                raw.sendall(proof)
            try:
                assert raw.recv(1) == b""
            except ConnectionResetError:
                pass  # closed with our bytes unread: hung up all the same
    connect(str(directory), key).close()
    # The refusals did not disturb it.
    with Isolator("zygote", zygote=str(directory)) as iso:
        assert iso.run(sum, ([1, 2, 3],), timeout=30).value == 6


class Impostor(threading.Thread):
    """Listens on a zygote's socket without knowing its key, and records what callers send."""

    def __init__(self, directory: Path) -> None:
        super().__init__(daemon=True)
        directory.mkdir(mode=0o700, exist_ok=True)
        (directory / KEY_NAME).write_bytes(os.urandom(32))
        os.chmod(directory / KEY_NAME, 0o600)
        (directory / READY_NAME).write_text(str(os.getpid()))
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(str(directory / SOCKET_NAME))
        self.listener.listen(8)
        self.received = b""

    def run(self) -> None:
        conn, _ = self.listener.accept()
        conn.settimeout(5)
        conn.sendall(os.urandom(64))  # a nonce and a "proof" made without the key
        try:
            while chunk := conn.recv(4096):
                self.received += chunk
        except OSError:
            pass
        conn.close()


def test_a_caller_sends_nothing_to_a_zygote_that_cannot_prove_it_knows_the_key(tmp_path):
    impostor = Impostor(tmp_path / "z")
    impostor.start()
    with (
        pytest.raises(ZygoteUntrusted, match="does not know the zygote's key: it is not our zygote"),
        Isolator("zygote", zygote=str(tmp_path / "z"), env={"SECRET_TOKEN": "hunter2"}) as iso,
    ):
        iso.run(os.getpid, timeout=30)
    impostor.join(10)
    # Only the hello (magic and our nonce): no proof of ours, no environment, nothing to unpickle.
    assert len(impostor.received) == 36 and impostor.received.startswith(b"FGZ1"), impostor.received
    assert b"hunter2" not in impostor.received


def test_a_zygote_directory_or_key_open_to_others_is_refused(zygote, tmp_path):
    directory, _, _ = zygote
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o755)
    os.chmod(open_dir, 0o755)
    with pytest.raises(ZygoteUntrusted, match="is open to group or others .mode 0755.; it must be a private directory"):
        Isolator("zygote", zygote=str(open_dir))
    key = directory / KEY_NAME
    os.chmod(key, 0o644)
    try:
        with (
            pytest.raises(ZygoteUntrusted, match="is open to group or others .mode 0644.; it must be a private file"),
            Isolator("zygote", zygote=str(directory)) as iso,
        ):
            iso.run(os.getpid, timeout=30)
    finally:
        os.chmod(key, 0o600)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="only root can make files and processes of another user")
OTHER_UID = 54321


@needs_root
def test_a_zygote_directory_of_another_user_is_refused_by_caller_and_zygote(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, OTHER_UID, -1)
    with pytest.raises(ZygoteUntrusted, match=f"belongs to uid {OTHER_UID}, not to us"):
        Isolator("zygote", zygote=str(theirs))
    proc = subprocess.run([str(FEDGPU), "zygote", "--dir", str(theirs)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc
    assert proc.stderr.strip() == (
        f"fedgpu: error: --dir {theirs}: directory {theirs} belongs to uid {OTHER_UID}, not to us (uid 0)"
    ), proc.stderr


@needs_root
def test_a_socket_served_by_another_user_is_refused_before_the_handshake(tmp_path):
    directory = tmp_path / "z"
    directory.mkdir(mode=0o700)
    (directory / KEY_NAME).write_bytes(os.urandom(32))
    os.chmod(directory / KEY_NAME, 0o600)
    (directory / READY_NAME).write_text("1")
    # Bound as us, listening as another user: the kernel gives callers the listener's credentials.
    server = subprocess.Popen(
        [sys.executable, "-c", f"""
import os, socket, sys, time
listener = socket.socket(socket.AF_UNIX)
listener.bind({str(directory / SOCKET_NAME)!r})
os.setuid({OTHER_UID})
listener.listen(4)
print("listening", flush=True)
conn, _ = listener.accept()
conn.settimeout(5)
data = b""
try:
    while chunk := conn.recv(4096):
        data += chunk
except OSError:
    pass
print(len(data), flush=True)
"""],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert server.stdout.readline().strip() == "listening"
        with pytest.raises(ZygoteUntrusted, match=f"runs as uid {OTHER_UID}, not as us"):
            connect(str(directory), read_key(str(directory)))
        assert server.stdout.readline().strip() == "0"  # not even our hello reached it
    finally:
        server.kill()
        server.wait()


def test_idle_slow_and_garbage_connections_do_not_stall_a_real_call(zygote):
    """50 idle connections, one that drips its hello byte by byte, one that proves the key and then
    idles, one of garbage: the zygote serves a real caller meanwhile (the old one took 5 s per idler)."""
    directory, _, _ = zygote
    path = str(directory / SOCKET_NAME)
    idle = []
    for _ in range(50):
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(path)
        idle.append(sock)
    authenticated = connect(str(directory), read_key(str(directory)))  # then says nothing
    garbage = socket.socket(socket.AF_UNIX)
    garbage.connect(path)
    garbage.sendall(os.urandom(4096))
    drip = socket.socket(socket.AF_UNIX)
    drip.connect(path)
    hello = b"FGZ1" + os.urandom(32)
    durations = []
    try:
        with Isolator("zygote", zygote=str(directory)) as iso:
            for byte in hello[:10]:
                # Calls slowed by a busy machine can outlast the zygote's 2 s handshake deadline: then it has
                # dropped the drip, as it should, and the calls go on beside the rest.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    drip.send(bytes([byte]))
                started = time.monotonic()
                assert iso.run(sum, ([1, 2],), timeout=30).value == 3
                durations.append(time.monotonic() - started)
    finally:
        for sock in (*idle, authenticated, garbage, drip):
            sock.close()
    # Generous for a loaded machine; the stalled design needed 5 s and more per call.
    assert max(durations) < 2.0, durations


# Connects as the zygote's user and sends the magic until it holds 1000 such connections
# (the first 100 held until the zygote's 2 s handshake deadline drops them); then, every
# 100 ms, closes the other 900 while the zygote still waits for the rest of their hello,
# writes a byte to stdout and opens 900 new ones at once; until killed (20 s at most).
FLOOD = r"""
import os, resource, socket, sys, time
path, full, held, kept = sys.argv[1], sys.argv[2], 1000, 100
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if soft < 2048 and (hard == resource.RLIM_INFINITY or hard > soft):
    resource.setrlimit(resource.RLIMIT_NOFILE, (2048 if hard == resource.RLIM_INFINITY else min(hard, 2048), hard))
held = min(held, resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 64)
conns, deadline = [], time.monotonic() + 20
while time.monotonic() < deadline:
    while len(conns) < held and time.monotonic() < deadline:
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(1.0)
        try:
            sock.connect(path)
            sock.send(b"FGZ1")
        except OSError:
            sock.close()
            time.sleep(0.001)  # the zygote is gone or its queue is full: try again
            continue
        conns.append(sock)
    open(full, "w").close()
    time.sleep(0.1)
    for sock in conns[kept:]:
        sock.close()
    del conns[kept:]
    os.write(1, b".")  # a burst of connections starts
"""


def _next_burst(flood: subprocess.Popen) -> None:
    """Wait (5 s at most) until the flood starts its next burst of connections."""
    fd = flood.stdout.fileno()
    os.set_blocking(fd, False)
    try:
        while os.read(fd, 4096):  # the bursts already started
            pass
    except BlockingIOError:
        pass
    select.select([fd], [], [], 5.0)


def test_a_flood_of_held_connections_neither_crashes_the_zygote_nor_costs_a_real_call(tmp_path):
    """1000 connections of our own user that send the magic and hang on, closed and reopened by
    the hundred, beside 20 real calls, each made as the flood opens hundreds of connections at
    once: the zygote once evicted the oldest handshake while its event was still queued (KeyError:
    the zygote died), and evicted real callers in the middle of their handshake."""
    directory = tmp_path / "z"
    log = tmp_path / "zygote.log"
    zygote_proc = start_zygote(directory, "fedgpu.isolation.serve", log=log)
    flood = None
    try:
        wait_ready(directory, zygote_proc)
        # A first call before the flood: the caller has the key, so a zygote that dies later
        # fails the calls at once (without it, a caller waits minutes for the zygote to be ready).
        iso = Isolator("zygote", zygote=str(directory))
        assert iso.run(sum, ([1, 1],), timeout=30).value == 2
        full = tmp_path / "flood-full"
        flood = subprocess.Popen([sys.executable, "-c", FLOOD, str(directory / SOCKET_NAME), str(full)],
                                 stdout=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while not full.exists() and zygote_proc.poll() is None:
            assert flood.poll() is None and time.monotonic() < deadline, "the flood never held its connections"
            time.sleep(0.05)
        assert zygote_proc.poll() is None, f"the zygote died under the flood: {read_or_empty(log)[-2000:]}"
        failures = []
        with iso:
            for i in range(20):
                _next_burst(flood)
                if zygote_proc.poll() is not None:
                    failures.append(f"call {i}: the zygote died (exit code {zygote_proc.returncode})")
                    break
                try:
                    assert iso.run(sum, ([i, 1],), timeout=30).value == i + 1
                except Exception as err:  # noqa: BLE001 - count them all, then report
                    failures.append(f"call {i}: {type(err).__name__}: {err}")
            flooding = flood.poll() is None  # the calls ran while the flood went on
            flood.kill()
            flood.wait(10)
            alive = zygote_proc.poll() is None
            after = iso.run(sum, ([2, 2],), timeout=30).value if alive else None
        text = read_or_empty(log)
        assert not failures and alive, f"{len(failures)} of 20 calls failed: {failures[:3]}; zygote log: {text[-2000:]}"
        assert flooding, "the flood ended before the calls did"
        assert after == 4
        assert "Traceback" not in text, text
    finally:
        if flood is not None:
            if flood.poll() is None:
                flood.kill()
                flood.wait(10)
            flood.stdout.close()
        zygote_proc.terminate()
        zygote_proc.wait(10)


def test_a_new_zygote_replaces_a_dead_ones_socket_and_refuses_beside_a_live_one(tmp_path):
    directory = tmp_path / "z"
    first = start_zygote(directory)
    wait_ready(directory, first)
    second = subprocess.run([str(FEDGPU), "zygote", "--dir", str(directory)], capture_output=True, text=True,
                            timeout=60)
    assert second.returncode == 2, second
    assert second.stderr.strip() == (f"fedgpu: error: --dir {directory}: a zygote is already serving {directory} "
                                     f"(pid {first.pid})")
    first.kill()  # SIGKILL: no clean-up, its socket, key and ready file stay behind
    first.wait(10)
    assert (directory / SOCKET_NAME).exists() and (directory / READY_NAME).exists()
    third = start_zygote(directory)
    try:
        # The dead zygote's ready file goes first, then the new one writes its own.
        deadline = time.monotonic() + 60
        while not (directory / READY_NAME).exists() or (directory / READY_NAME).read_text() != str(third.pid):
            assert third.poll() is None and time.monotonic() < deadline, f"zygote exited with {third.returncode}"
            time.sleep(0.05)
        with Isolator("zygote", zygote=str(directory)) as iso:
            assert iso.run(os.getpid, timeout=30).value != third.pid
    finally:
        third.terminate()
        third.wait(10)


def test_zygote_is_warm_single_threaded_and_never_touched_cuda(zygote):
    directory, pid, log = zygote
    assert len(os.listdir(f"/proc/{pid}/task")) == 1
    assert "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    with Isolator("zygote", zygote=str(directory)) as iso:
        state = iso.run(_torch_state, timeout=30).value
    # torch and the lazy imports behind the first optimizer step came with the fork.
    assert state == {"torch_was_loaded": True, "dynamo_was_loaded": True, "cuda_initialized": False, "threads": 1}
    assert "ready in" in log.read_text()


def test_zygote_children_do_not_share_random_state(zygote):
    directory, _, _ = zygote
    with Isolator("zygote", zygote=str(directory)) as iso:
        first, second = (iso.run(_random_draws, timeout=30).value for _ in range(2))
    for a, b in zip(first, second):  # Python's, NumPy's and torch's generators
        assert a != b


def test_zygote_child_has_the_callers_env_cwd_and_stdout(zygote, tmp_path):
    directory, _, log = zygote
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS_DIR / "zygote_caller.py"), str(directory)],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr
    assert "HELLO FROM THE CHILD" in proc.stdout
    assert "HELLO FROM THE CHILD" not in log.read_text()
    seen = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert seen["var"] == "from-the-caller"
    assert seen["cwd"] == str(tmp_path)
    assert "FEDGPU_TEST_VAR" not in os.environ


def test_zygote_refuses_to_fork_with_a_thread_running(tmp_path):
    directory = tmp_path / "z"
    proc = start_zygote(directory, "zygote_warmups:start_thread", log=tmp_path / "log")
    assert proc.wait(60) == 2
    text = (tmp_path / "log").read_text().strip()
    assert text.startswith("fedgpu zygote: error:") and "single-threaded" in text, text
    assert len(text.splitlines()) == 1
    assert not (directory / SOCKET_NAME).exists()


def test_zygote_dies_with_its_parent_and_takes_its_children(tmp_path):
    pidfile = tmp_path / "pids"
    # A parent that starts a zygote, runs a long call through it, and is then killed.
    parent = subprocess.Popen(
        [sys.executable, str(SCRIPTS_DIR / "parent_dies.py"), str(pidfile), "zygote"],
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not pidfile.exists():
            assert time.monotonic() < deadline and parent.poll() is None
            time.sleep(0.05)
        child, grandchild = (int(word) for word in pidfile.read_text().split())
        zygote_pid = parent_pid(child)
        argv = Path(f"/proc/{zygote_pid}/cmdline").read_bytes().split(b"\0")
        zygote_dir = Path(argv[argv.index(b"--dir") + 1].decode())
        assert (zygote_dir / SOCKET_NAME).exists()
        parent.kill()
        parent.wait(5)
        deadline = time.monotonic() + 10
        while any(pid_alive(pid) for pid in (zygote_pid, child, grandchild)):
            assert time.monotonic() < deadline, "zygote or its child outlived the parent"
            time.sleep(0.05)
        assert not zygote_dir.exists(), "the private zygote removed its directory"
    finally:
        if parent.poll() is None:
            parent.kill()


@pytest.mark.parametrize("case", ["unknown-task", "dir-not-private", "dir-below-a-file"])
def test_fedgpu_zygote_bad_input_is_one_line_and_exit_2(tmp_path, case):
    directory = tmp_path / "z"
    if case == "unknown-task":
        args, words = ["--dir", str(directory), "--task", "no-such-task"], "unknown task 'no-such-task'"
    elif case == "dir-not-private":
        directory.mkdir()
        os.chmod(directory, 0o755)
        args, words = ["--dir", str(directory)], "must be a private directory"
    else:
        (tmp_path / "afile").write_text("")
        args, words = ["--dir", str(tmp_path / "afile" / "sub")], "cannot create"
    proc = subprocess.run([str(FEDGPU), "zygote", *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc
    assert proc.stderr.startswith("fedgpu: error:") and words in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


# --- @isolate(mode="zygote") on a plain Flower function -----------------------------


def _state_and_pid(msg, context):
    from flwr.app import ConfigRecord, Message, RecordDict

    loaded = {name: name in sys.modules for name in ("numpy", "torch", "torch._dynamo")}  # before it imports any
    context.state["seen"] = ConfigRecord({"pid": os.getpid(), "ppid": os.getppid(), **loaded})
    return Message(RecordDict({"echo": ConfigRecord({"value": msg.content["in"]["value"] * 2})}), reply_to=msg)


def test_isolate_decorator_forks_from_a_private_zygote_with_its_preloads(monkeypatch):
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from fedgpu.flower import isolate
    from fedgpu.flower.transfer import adopt_task_identity, task_identity

    monkeypatch.delenv("FEDGPU_ZYGOTE", raising=False)
    monkeypatch.setitem(globals(), "_isolated", isolate(_state_and_pid, mode="zygote", preload=("torch",)))
    saved = task_identity()
    adopt_task_identity((7, 1, 1))  # as a Flower runtime would have set it
    try:
        message = Message(RecordDict({"in": ConfigRecord({"value": 21})}), dst_node_id=1, message_type="train")
        context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
        replies = [globals()["_isolated"](message, context) for _ in range(2)]
    finally:
        adopt_task_identity(saved)
    assert [r.content["echo"]["value"] for r in replies] == [42, 42]
    seen = context.state["seen"]  # the state came back from the child
    assert seen["pid"] != os.getpid() and seen["numpy"] is True
    # torch came with the fork, and so did what its first optimizer would load lazily (2 s per child).
    assert seen["torch"] is True and seen["torch._dynamo"] is True
    assert seen["ppid"] != os.getpid(), "forked by the zygote, not spawned by us"


def _zygote_children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _wait_children(pid: int, count: int, timeout: float = 60) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(children := _zygote_children(pid)) != count:
        assert time.monotonic() < deadline, f"zygote has children {children}, expected {count}"
        time.sleep(0.05)
    return children


def test_a_zygote_serves_where_its_socket_path_is_too_long_for_a_unix_address(tmp_path):
    directory = tmp_path / ("z" * 120)  # under a long $TMPDIR, say; the socket's path is over 107 bytes
    directory.mkdir(mode=0o700)
    proc = start_zygote(directory)
    try:
        pid = wait_ready(directory, proc)
        with Isolator("zygote", zygote=str(directory)) as iso:
            outcome = iso.run(os.getppid, timeout=30)
        assert outcome.value == pid  # forked by that zygote
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_primed_spare_takes_the_next_call_and_is_replaced(zygote):
    directory, pid, _ = zygote
    (spare,) = _wait_children(pid, 1)  # forked ahead of any call, primed with the task's warm-up
    with Isolator("zygote", zygote=str(directory)) as iso:
        outcome = iso.run(os.getpid, timeout=30)
    assert outcome.value == outcome.pid == spare
    (next_spare,) = _wait_children(pid, 1)
    assert next_spare != spare
