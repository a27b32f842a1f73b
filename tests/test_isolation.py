"""Tests for fedgpu.isolation: real child processes, real signals, no mocks.

Every test is bounded by a SIGALRM watchdog (see ``_watchdog``) and cleans up
any process it started. Functions that run in a child are module-level here, so
the child imports this module by reference (it receives the parent's sys.path).
Helper scripts and a never-imported-by-the-parent module live in
``tests/isolation_scripts/``.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from fedgpu.isolation import (
    ChildDied,
    ChildRaised,
    ChildTimedOut,
    IsolationError,
    Isolator,
    Outcome,
    RemoteTraceback,
    wire,
)
from fedgpu.isolation.procs import stop_tree

SCRIPTS_DIR = Path(__file__).resolve().parent / "isolation_scripts"
PROBE_MODULE = "fedgpu_isolation_exc_probe"  # only ever imported by children
TEST_LIMIT_SECONDS = 40  # per test; the whole file runs in well under a minute


# --- per-test bounds and cleanup -------------------------------------------------


class WatchdogTimeout(BaseException):
    """Raised in the main thread when a test runs past TEST_LIMIT_SECONDS."""


@pytest.fixture(autouse=True)
def _watchdog():
    """Fail (instead of hanging) a test that runs past TEST_LIMIT_SECONDS.

    The handler raises, so blocking calls (poll, sleep, wait) are interrupted
    rather than retried. Interval timers are not inherited by forked children.
    """

    def on_alarm(signum, frame):
        raise WatchdogTimeout(f"test ran past {TEST_LIMIT_SECONDS} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, TEST_LIMIT_SECONDS)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def reap():
    """Collects pids a test started indirectly; SIGKILLs survivors at teardown."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if not _gone(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


CHILD_MODES = ["spawn", "zygote"]


@pytest.fixture(scope="module")
def shared_zygote(tmp_path_factory):
    """One zygote for this module's zygote-mode tests, as a launcher runs it: (dir, pid)."""
    directory = tmp_path_factory.mktemp("zygote")
    os.chmod(directory, 0o700)
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedgpu.isolation.zygote", "--dir", str(directory), "--parent-pid", str(os.getpid()),
         "numpy"],
        stdin=subprocess.DEVNULL,
    )
    yield str(directory), proc.pid
    proc.terminate()
    proc.wait(10)


@pytest.fixture(params=CHILD_MODES)
def make_isolator(request):
    """Isolator factory for each child mode; zygote mode uses the shared zygote."""

    def make(**kwargs) -> Isolator:
        if request.param == "zygote":
            kwargs.setdefault("zygote", request.getfixturevalue("shared_zygote")[0])
        return Isolator(request.param, **kwargs)

    make.mode = request.param
    return make


def _gone(pid: int) -> bool:
    """True if ``pid`` no longer runs; a zombie (state Z) counts as gone.

    (PID 1 in some containers never reaps orphans, so killed grandchildren can
    stay zombies forever.)
    """
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_gone(pids, timeout: float) -> list[int]:
    """Wait up to ``timeout`` s for all ``pids`` to be gone; return the survivors."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [pid for pid in pids if not _gone(pid)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.02)


def _wait_pids(path: Path, timeout: float) -> list[int]:
    """Wait for a file of whitespace-separated pids (written atomically)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() >= deadline:
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.02)
    return [int(word) for word in path.read_text().split()]


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


# --- functions that run in a child -------------------------------------------------


def _write_pids(pidfile: str, *pids: int) -> None:
    with open(pidfile + ".tmp", "w") as f:
        f.write(" ".join(str(pid) for pid in pids))
    os.replace(pidfile + ".tmp", pidfile)


def _double_plus_one(arr: np.ndarray) -> np.ndarray:
    out = arr * np.float32(2)
    out += np.float32(1)
    return out


def _deep_helper_that_fails(x: int) -> int:
    raise ValueError(f"bad value {x} in pid {os.getpid()}")


def _middle_layer(x: int) -> int:
    return _deep_helper_that_fails(x) + 1


def _raise_deep(x: int) -> int:
    return _middle_layer(x) * 2


def _raise_probe_error(scripts_dir: str, text: str) -> None:
    if scripts_dir not in sys.path:
        sys.path.insert(0, scripts_dir)
    import fedgpu_isolation_exc_probe

    raise fedgpu_isolation_exc_probe.ProbeError(text)


def _raise_called_process_error() -> None:
    raise subprocess.CalledProcessError(5, ["fake-cmd"])


def _sigkill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _segfault() -> None:
    import ctypes
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file
    ctypes.string_at(0)


def _exit_3() -> None:
    os._exit(3)


def _grandchild_then_sleep(pidfile: str) -> None:
    grandchild = subprocess.Popen(["sleep", "300"])
    _write_pids(pidfile, os.getpid(), grandchild.pid)
    time.sleep(300)


def _trap_sigterm_then_sleep(pidfile: str) -> None:
    def note_and_ignore(signum, frame):
        with open(pidfile + ".term", "a") as f:
            f.write("TERM\n")

    signal.signal(signal.SIGTERM, note_and_ignore)
    _write_pids(pidfile, os.getpid())
    time.sleep(300)


def _pid_then_sleep(pidfile: str) -> None:
    _write_pids(pidfile, os.getpid())
    time.sleep(300)


def _ignore_sigterm_pid_then_sleep(pidfile: str) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _write_pids(pidfile, os.getpid())
    time.sleep(300)


def _leave_grandchild() -> int:
    return subprocess.Popen(["sleep", "300"]).pid


def _interpreter_facts() -> dict:
    return {
        "pid": os.getpid(),
        "var": os.environ.get("FEDGPU_TEST_VAR"),
        "dont_write_bytecode": sys.dont_write_bytecode,
        "hash_randomization": sys.flags.hash_randomization,
        "hash": hash("fedgpu isolation hash probe"),
    }


def _process_ids() -> dict:
    return {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "pgid": os.getpgid(0),
        "sid": os.getsid(0),
    }


def _grandchild_and_unloadable_result(scripts_dir: str, pidfile: str):
    # The result's class lives in a module the parent cannot import.
    grandchild = subprocess.Popen(["sleep", "300"])
    _write_pids(pidfile, grandchild.pid)
    sys.path.insert(0, scripts_dir)
    import fedgpu_isolation_exc_probe

    return fedgpu_isolation_exc_probe.ProbeError("a result, not an error")


# --- 1. large arrays out of band -------------------------------------------------

N_FLOATS = 25_000_000  # float32: 100 MB


def test_100mb_round_trip_returns_equal_writable_array(make_isolator):
    arr = np.arange(N_FLOATS, dtype=np.float32)
    assert arr.nbytes == 100_000_000
    with make_isolator() as iso:
        outcome = iso.run(_double_plus_one, (arr,), timeout=30)
    out = outcome.value
    assert isinstance(out, np.ndarray)
    assert out.dtype == np.float32 and out.shape == (N_FLOATS,)
    assert np.array_equal(out, _double_plus_one(arr))
    assert out.flags.writeable
    out[0] = 42.0  # really writable, not just flagged
    assert out[0] == 42.0
    assert outcome.pid != os.getpid() and outcome.mode == make_isolator.mode
    assert outcome.seconds >= outcome.work_seconds > 0
    # Input (100 MB) + result (100 MB) + interpreter (for a zygote's child, the
    # zygote's pages too: numpy only here); an in-band pickle of the result
    # would add at least 100 MB more on the child's side.
    assert outcome.max_rss_kib < 330 * 1024, outcome.max_rss_kib


def test_wire_dumps_puts_large_array_out_of_band():
    arr = np.arange(N_FLOATS, dtype=np.float32)
    data, buffers = wire.dumps(arr)
    assert len(data) < 1000, len(data)  # structure only: a few hundred bytes
    assert len(buffers) == 1
    raw = buffers[0].raw()
    assert raw.nbytes == 100_000_000
    back = wire.loads(data, [bytearray(raw)])
    assert back.flags.writeable and np.array_equal(back, arr)


def test_wire_small_in_band_large_bytes_out_of_band():
    small = np.arange(100, dtype=np.float64)  # 800 bytes: cheaper in band
    data, buffers = wire.dumps(small)
    assert buffers == [] and np.array_equal(wire.loads(data, []), small)

    blob = os.urandom(200_000)
    data, buffers = wire.dumps({"blob": blob, "tiny": b"abc"})
    assert len(buffers) == 1 and buffers[0].raw().nbytes == len(blob)
    assert len(data) < 1000
    assert wire.loads(data, [bytearray(b.raw()) for b in buffers]) == {"blob": blob, "tiny": b"abc"}

    objects = np.array([object(), "x"] * 50_000, dtype=object)  # never out of band
    data, buffers = wire.dumps(objects)
    assert buffers == []

    strided = np.arange(1_000_000, dtype=np.float32)[::2]  # not contiguous
    data, buffers = wire.dumps(strided)
    assert len(data) < 1000 and sum(b.raw().nbytes for b in buffers) == strided.nbytes
    back = wire.loads(data, [bytearray(b.raw()) for b in buffers])
    assert back.flags.writeable and np.array_equal(back, strided)


def test_wire_send_recv_over_socketpair():
    a, b = socket.socketpair()
    payload = {
        "array": np.arange(5_000_000, dtype=np.int64).reshape(1000, 5000),
        "fortran": np.asfortranarray(np.ones((400, 300))),
        "bytes": os.urandom(300_000),
        "text": "hello",
    }
    errors: list[BaseException] = []

    def sender():  # the payload is larger than the socket buffers
        try:
            wire.send_object(a, payload)
            wire.send_object(a, "second")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    thread = threading.Thread(target=sender)
    thread.start()
    try:
        got = wire.recv_object(b)
        assert wire.recv_object(b) == "second"
    finally:
        thread.join(10)
        a.close()
    assert not errors
    assert np.array_equal(got["array"], payload["array"]) and got["array"].flags.writeable
    assert np.array_equal(got["fortran"], payload["fortran"]) and got["fortran"].flags.writeable
    assert got["bytes"] == payload["bytes"] and got["text"] == "hello"
    with pytest.raises(EOFError):  # the peer closed: no half frames
        wire.recv_object(b)
    b.close()


# --- 2./3. exceptions ----------------------------------------------------------------


def test_child_exception_carries_remote_traceback(make_isolator):
    with make_isolator() as iso, pytest.raises(ChildRaised) as info:
        iso.run(_raise_deep, (42,), timeout=30)
    err = info.value
    child_pid = int(str(err.original).rsplit(" ", 1)[1])
    assert err.pid == child_pid != os.getpid()
    assert err.type_name == "ValueError"
    assert err.message == f"bad value 42 in pid {child_pid}"
    for text in (str(err), err.remote_traceback):
        assert "_deep_helper_that_fails" in text
        assert "_middle_layer" in text
        assert "bad value 42" in text
    assert isinstance(err.original, ValueError)
    assert err.original.args == (f"bad value 42 in pid {child_pid}",)
    assert isinstance(err.original.__cause__, RemoteTraceback)
    assert "_deep_helper_that_fails" in str(err.original.__cause__)
    assert err.__cause__ is err.original
    assert isinstance(err, IsolationError) and "ValueError" in err.reason


def test_child_exception_from_unimported_module_is_not_imported(monkeypatch, make_isolator):
    assert PROBE_MODULE not in sys.modules
    # Make the module importable here too, so that naively unpickling the
    # exception in the parent would succeed (and import it).
    monkeypatch.syspath_prepend(str(SCRIPTS_DIR))
    assert importlib.util.find_spec(PROBE_MODULE) is not None  # found, not imported
    assert PROBE_MODULE not in sys.modules

    with make_isolator() as iso, pytest.raises(ChildRaised) as info:
        iso.run(_raise_probe_error, (str(SCRIPTS_DIR), "probe failure 7"), timeout=30)
    err = info.value
    assert err.original is None
    assert err.__cause__ is None
    assert err.type_name == "ProbeError"
    assert "ProbeError" in str(err) and "probe failure 7" in str(err)
    assert f"{PROBE_MODULE}.ProbeError: probe failure 7" in err.remote_traceback
    assert PROBE_MODULE not in sys.modules


def test_child_exception_from_imported_module_is_rebuilt(make_isolator):
    with make_isolator() as iso, pytest.raises(ChildRaised) as info:
        iso.run(_raise_called_process_error, timeout=30)
    original = info.value.original
    assert isinstance(original, subprocess.CalledProcessError)
    assert original.returncode == 5 and original.cmd == ["fake-cmd"]
    assert isinstance(original.__cause__, RemoteTraceback)
    assert info.value.type_name == "CalledProcessError"


# --- 4. deaths ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fn", "returncode", "signal_name", "words"),
    [
        (_sigkill_self, -9, "SIGKILL", ["SIGKILL", "killed"]),
        (_segfault, -11, "SIGSEGV", ["SIGSEGV", "killed"]),
        (_exit_3, 3, None, ["exited with code 3"]),
    ],
    ids=["sigkill", "segfault", "exit3"],
)
def test_child_death_is_named(fn, returncode, signal_name, words, make_isolator):
    with make_isolator() as iso, pytest.raises(ChildDied) as info:
        iso.run(fn, timeout=30)
    err = info.value
    assert err.returncode == returncode
    assert err.signal_name == signal_name
    for word in words:
        assert word in str(err)
    assert err.pid is not None and err.pid != os.getpid()
    assert str(err.pid) in str(err)
    assert _gone(err.pid)
    if signal_name:
        assert err.kind == f"killed by {signal_name}"
        # Not stopped by us, and a likely cause is named.
        assert err.reason.startswith(f"killed by {signal_name}, not by fedgpu (likely "), err.reason
        assert "likely" in str(err)
    else:
        assert "exit" in str(err) and "3" in str(err)
        assert err.kind == "exit code 3"


# --- 5./6./7. timeouts and process groups ---------------------------------------------


def test_timeout_kills_child_and_grandchild(tmp_path, reap, make_isolator):
    pidfile = tmp_path / "pids"
    # The timeout counts the child's start too: a spawned one (a fresh interpreter importing this test module)
    # took over 3 s to write its pids with three test files at work on two cores.
    with make_isolator(grace=0.5) as iso:
        started = time.monotonic()
        with pytest.raises(ChildTimedOut) as info:
            iso.run(_grandchild_then_sleep, (str(pidfile),), timeout=6)
        elapsed = time.monotonic() - started
    child, grandchild = _wait_pids(pidfile, 0)
    reap.extend([child, grandchild])
    assert 6.0 <= elapsed < 8.5, elapsed
    assert info.value.pid == child and info.value.timeout == 6
    assert "timeout of 6 s" in str(info.value)
    assert _wait_gone([child, grandchild], 1.0) == []


def test_timeout_kills_child_that_ignores_sigterm(tmp_path, reap, make_isolator):
    pidfile = tmp_path / "pids"
    grace, timeout = 0.5, 6.0  # the timeout counts the child's start too: a spawned one starts slowly on a busy host
    with make_isolator(grace=grace) as iso:
        started = time.monotonic()
        with pytest.raises(ChildTimedOut) as info:
            iso.run(_trap_sigterm_then_sleep, (str(pidfile),), timeout=timeout)
        elapsed = time.monotonic() - started
    # The handler is in place before the pid file exists.
    (child,) = _wait_pids(pidfile, 0)
    reap.append(child)
    assert info.value.pid == child
    # TERM was delivered (and ignored), then KILL after the grace period.
    assert Path(str(pidfile) + ".term").read_text().startswith("TERM")
    assert timeout + grace - 0.05 <= elapsed < timeout + 3.0, elapsed
    assert _wait_gone([child], 1.0) == []


def test_grandchild_left_after_success_is_killed(reap, make_isolator):
    with make_isolator() as iso:
        outcome = iso.run(_leave_grandchild, timeout=30)
    grandchild = outcome.value
    reap.append(grandchild)
    assert isinstance(grandchild, int) and grandchild not in (os.getpid(), outcome.pid)
    assert _wait_gone([grandchild], 1.0) == []
    assert _gone(outcome.pid)


# --- 8./9. real parent processes --------------------------------------------------------


@pytest.mark.parametrize("how", ["spawn", "private-zygote", "shared-zygote"])
def test_child_dies_with_its_parent(tmp_path, reap, how, request):
    pidfile = tmp_path / "pids"
    args = {"spawn": ["spawn"], "private-zygote": ["zygote"]}.get(how)
    if args is None:
        args = ["zygote", request.getfixturevalue("shared_zygote")[0]]
    parent = subprocess.Popen(
        [sys.executable, str(SCRIPTS_DIR / "parent_dies.py"), str(pidfile), *args],
        stdin=subprocess.DEVNULL,
    )
    reap.append(parent.pid)
    try:
        child, grandchild = _wait_pids(pidfile, 20)
        reap.extend([child, grandchild])
        assert not _gone(child) and not _gone(grandchild)
        forker = psutil.Process(child).ppid()
        if how == "spawn":
            assert forker == parent.pid
        elif how == "private-zygote":  # the zygote is the caller's child
            assert psutil.Process(forker).ppid() == parent.pid
            reap.append(forker)
        else:  # the shared zygote sees its caller's connection close
            assert forker == request.getfixturevalue("shared_zygote")[1]
        assert os.getpgid(grandchild) == child  # the child leads its own group
        parent.kill()
        assert parent.wait(5) == -signal.SIGKILL
        assert _wait_gone([child, grandchild], 5.0) == []
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(5)


def test_stop_tree_stops_children_before_their_parent_and_counts_a_zombie_as_gone(tmp_path, reap):
    """What the SuperLink's tree needs: a child whose exit talks to its parent exits cleanly, and a zombie that its
    parent never reaps does not hold the stop for the whole grace."""
    result = tmp_path / "child"
    parent = subprocess.Popen([sys.executable, str(SCRIPTS_DIR / "tree_needs_parent.py"), str(result)],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    reap.append(parent.pid)
    try:
        assert parent.stdout.readline().split()[0] == "ready"
        tree = [parent.pid, *(p.pid for p in psutil.Process(parent.pid).children(recursive=True))]
        reap.extend(tree)
        assert len(tree) == 3
        started = time.monotonic()
        stop_tree(parent.pid, grace=30.0)
        took = time.monotonic() - started
        assert result.read_text() == "clean"
        assert took < 15.0, f"took {took:.1f} s of a 30 s grace"  # the zombie counted as gone at once
        assert parent.wait(5) == -signal.SIGTERM  # TERMed, and left for its parent (us) to reap
        assert _wait_gone(tree, 5.0) == []
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(5)


@pytest.mark.parametrize("mode", CHILD_MODES)
def test_main_module_functions_closures_and_lambdas_travel(mode):
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS_DIR / "main_functions.py"), mode],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, proc.stdout
    results = json.loads(lines[0][len("RESULT ") :])
    assert results["hypot_scaled"] == 15.0  # SCALE * math.hypot(3, 4)
    assert results["closure"] == 74  # 1 + 7 * 10 + SCALE
    assert results["lambda"] == 144
    child_pid = results["child"]
    assert isinstance(child_pid, int) and child_pid != results["parent_pid"]


# --- 10./11. environment and process identity -------------------------------------------


def test_env_reaches_child_at_interpreter_start():
    parent_env = dict(os.environ)
    iso_env = {"FEDGPU_TEST_VAR": "x", "PYTHONDONTWRITEBYTECODE": "1"}
    with Isolator("spawn", env=iso_env) as iso:
        first = iso.run(_interpreter_facts, env={"PYTHONHASHSEED": "0"}, timeout=30).value
        second = iso.run(_interpreter_facts, env={"PYTHONHASHSEED": "0"}, timeout=30).value
        other_seed = iso.run(_interpreter_facts, env={"PYTHONHASHSEED": "1", "FEDGPU_TEST_VAR": "y"}, timeout=30).value
    assert first["pid"] != second["pid"]
    assert first["var"] == second["var"] == "x"
    assert other_seed["var"] == "y"  # per-call env wins over the Isolator's
    # Read by the interpreter at start-up, so set before the child started.
    assert first["dont_write_bytecode"] is True
    assert first["hash_randomization"] == 0
    assert first["hash"] == second["hash"]
    assert first["hash"] != other_seed["hash"]
    # The parent itself is untouched.
    assert dict(os.environ) == parent_env
    assert "FEDGPU_TEST_VAR" not in os.environ
    if "PYTHONDONTWRITEBYTECODE" not in parent_env:
        assert sys.dont_write_bytecode is False


def test_each_call_is_a_new_child_leading_its_own_group_and_session(make_isolator, request):
    with make_isolator() as iso:
        outcomes = [iso.run(_process_ids, timeout=30) for _ in range(3)]
    # A spawned child is ours; a zygote's child is the zygote's, which reaps it.
    parent = request.getfixturevalue("shared_zygote")[1] if make_isolator.mode == "zygote" else os.getpid()
    pids = [o.value["pid"] for o in outcomes]
    assert len(set(pids)) == 3 and os.getpid() not in pids
    for outcome in outcomes:
        ids = outcome.value
        assert outcome.pid == ids["pid"]
        assert ids["ppid"] == parent
        assert ids["pgid"] == ids["pid"] != os.getpgid(0)
        assert ids["sid"] == ids["pid"] != os.getsid(0)
        assert _gone(ids["pid"])


# --- 12. mode none -----------------------------------------------------------------------


class _InProcessError(Exception):
    pass


def test_mode_none_runs_in_process():
    iso = Isolator("none")
    seen: list[int] = []
    outcome = iso.run(seen.append, (7,))
    assert seen == [7]  # same objects: it ran here
    assert isinstance(outcome, Outcome)
    assert outcome.pid == os.getpid() and outcome.mode == "none" and outcome.value is None
    assert iso.run(sum, ([1, 2, 3],)).value == 6

    error = _InProcessError("unchanged")

    def fail():
        raise error

    with pytest.raises(_InProcessError) as info:
        iso.run(fail)
    assert info.value is error
    assert not isinstance(info.value, IsolationError)


# --- 13. shutdown ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "fn",
    [_pid_then_sleep, _ignore_sigterm_pid_then_sleep],
    ids=["cooperative", "ignores-sigterm"],
)
def test_shutdown_from_another_thread_stops_call_in_flight(tmp_path, reap, fn, make_isolator):
    pidfile = tmp_path / "pids"
    grace = 0.5
    iso = make_isolator(grace=grace)
    stopper_errors: list[BaseException] = []
    shutdown_at: list[float] = []

    def stopper():
        try:
            _wait_pids(pidfile, 20)
            shutdown_at.append(time.monotonic())
            iso.shutdown()
        except BaseException as exc:  # noqa: BLE001
            stopper_errors.append(exc)

    thread = threading.Thread(target=stopper, daemon=True)
    thread.start()
    try:
        with pytest.raises(IsolationError) as info:
            iso.run(fn, (str(pidfile),))  # no timeout: only shutdown ends it
        ended = time.monotonic()
    finally:
        thread.join(10)
        iso.shutdown(0)
    (child,) = _wait_pids(pidfile, 0)
    reap.append(child)
    assert not stopper_errors, stopper_errors
    assert shutdown_at and ended - shutdown_at[0] < grace + 2.0
    assert not isinstance(info.value, ChildTimedOut)
    assert info.value.pid == child
    if fn is _ignore_sigterm_pid_then_sleep:
        assert isinstance(info.value, ChildDied) and info.value.signal_name == "SIGKILL"
    # fedgpu stopped it, and says so: not an OOM kill, not a crash.
    assert info.value.kind == "stopped by fedgpu (shutting down)", info.value.reason
    assert _wait_gone([child], 1.0) == []

    with pytest.raises(RuntimeError) as refused:
        iso.run(_process_ids)
    assert type(refused.value) is RuntimeError
    assert "shut down" in str(refused.value)


# --- 14. modes ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["fork", "", "SPAWN"])
def test_unknown_mode_is_refused(mode):
    with pytest.raises(ValueError) as info:
        Isolator(mode)
    assert repr(mode) in str(info.value)
    assert all(name in str(info.value) for name in ("zygote", "spawn", "none"))


# --- failures on our side of the pipe still clean up -------------------------------------


def test_unpicklable_argument_leaks_no_descriptor_or_child(make_isolator):
    with make_isolator() as iso:
        iso.run(_process_ids, timeout=30)  # warm up lazy imports and fds
        gc.collect()
        before = _open_fds()
        with pytest.raises(Exception):  # noqa: B017 - whichever error pickle raises for a generator
            iso.run(len, ((x for x in ()),), timeout=30)  # generators do not pickle
        gc.collect()
        time.sleep(0.2)
        after = _open_fds()
    assert after == before, f"leaked fds: {sorted(after - before)}"


def test_unloadable_result_still_stops_the_group(tmp_path, reap, make_isolator):
    pidfile = tmp_path / "pids"
    with make_isolator() as iso, pytest.raises(IsolationError):
        iso.run(_grandchild_and_unloadable_result, (str(SCRIPTS_DIR), str(pidfile)), timeout=30)
    (grandchild,) = _wait_pids(pidfile, 0)
    reap.append(grandchild)
    assert PROBE_MODULE not in sys.modules
    assert _wait_gone([grandchild], 1.0) == []


def _ignore_term_and_sleep() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(300)


def _stubborn_grandchild_and_sleep() -> None:
    subprocess.Popen(["sh", "-c", "trap '' TERM; sleep 300"])
    time.sleep(300)


def test_shutdown_with_two_stubborn_children_in_flight_stops_both(make_isolator):
    """shutdown() races with the calling threads finishing their children."""
    iso = make_isolator(grace=1)
    outcomes: dict[str, str] = {}

    def call(name: str, fn) -> None:
        try:
            iso.run(fn)
            outcomes[name] = "returned"
        except Exception as err:  # noqa: BLE001
            outcomes[name] = type(err).__name__

    threads = [
        threading.Thread(target=call, args=(name, fn), daemon=True)
        for name, fn in (("stubborn", _ignore_term_and_sleep), ("grandchild", _stubborn_grandchild_and_sleep))
    ]
    for thread in threads:
        thread.start()
    time.sleep(2.5)
    iso.shutdown()  # must not raise, must stop both
    for thread in threads:
        thread.join(10)
    assert outcomes == {"stubborn": "ChildDied", "grandchild": "ChildDied"}, outcomes


def test_timeout_must_be_positive(make_isolator):
    with make_isolator() as iso, pytest.raises(ValueError, match="timeout"):
        iso.run(len, ((),), timeout=0)


def _allocate_then_sigkill_self() -> None:
    hold = np.ones(300_000_000 // 8)  # 300 MB, touched
    assert hold.sum() > 0
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_death_names_the_childs_peak_memory(make_isolator):
    """For an OOM kill, the peak RSS is the first thing a reader wants to know."""
    with make_isolator() as iso, pytest.raises(ChildDied) as info:
        iso.run(_allocate_then_sigkill_self, timeout=30)
    assert info.value.signal_name == "SIGKILL"
    peak_mib = int(str(info.value).split("peak RSS was ")[1].split(" MiB")[0])
    assert 300 <= peak_mib < 2000, str(info.value)


# --- nothing a call started outlives it, whoever ended the call ------------------------


def _setsid_grandchild(pidfile: str, then: str) -> int:
    grandchild = subprocess.Popen(["sleep", "300"], start_new_session=True)  # out of our group's reach
    _write_pids(pidfile, grandchild.pid)
    if then == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    if then == "raise":
        raise RuntimeError("after starting a grandchild")
    return grandchild.pid


@pytest.mark.parametrize("then", ["return", "raise", "crash"])
def test_a_grandchild_in_its_own_session_does_not_outlive_the_call(tmp_path, reap, then, make_isolator):
    pidfile = tmp_path / "pids"
    with make_isolator() as iso, pytest.raises(IsolationError) if then != "return" else _no_error():
        iso.run(_setsid_grandchild, (str(pidfile), then), timeout=30)
    (grandchild,) = _wait_pids(pidfile, 0)
    reap.append(grandchild)
    assert os.getsid(grandchild) == grandchild if not _gone(grandchild) else True
    assert _wait_gone([grandchild], 5.0) == [], (
        f"grandchild {grandchild} in its own session outlived a call that ended by {then}")


class _no_error:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _sigstop_self() -> None:
    os.kill(os.getpid(), signal.SIGSTOP)


def test_a_stopped_child_is_ended_by_its_deadline_and_fedgpu_says_it_did(make_isolator):
    with make_isolator(grace=0.5) as iso, pytest.raises(ChildTimedOut) as info:
        iso.run(_sigstop_self, timeout=2)
    assert info.value.kind == "stopped by fedgpu after 2 s" and info.value.reason == "stopped by fedgpu after 2 s"
    assert _wait_gone([info.value.pid], 5.0) == []


def test_a_child_whose_zygote_died_has_an_unknown_exit_status(tmp_path):
    directory = tmp_path / "z"
    directory.mkdir(mode=0o700)
    zygote = subprocess.Popen([sys.executable, "-m", "fedgpu.isolation.zygote", "--dir", str(directory)],
                              stdin=subprocess.DEVNULL)
    try:
        pidfile = tmp_path / "pids"

        def kill_zygote() -> None:
            _wait_pids(pidfile, 20)
            zygote.kill()

        threading.Thread(target=kill_zygote, daemon=True).start()
        with Isolator("zygote", zygote=str(directory)) as iso, pytest.raises(ChildDied) as info:
            iso.run(_pid_then_sleep, (str(pidfile),), timeout=30)
    finally:
        zygote.kill()
        zygote.wait(10)
    # Nobody saw how the child ended: said so, never guessed as a SIGKILL.
    assert info.value.returncode is None and info.value.signal_name is None
    assert info.value.kind == "exit status unknown", info.value.reason
    assert "unknown" in str(info.value)


# --- errors cross process boundaries ----------------------------------------------------


def _all_errors() -> list:
    from fedgpu.errors import FedgpuError
    from fedgpu.flower.strategy import TooFewNodes
    from fedgpu.flower.superlink import ServerError
    from fedgpu.isolation.zygote import ZygoteError, ZygoteUntrusted
    from fedgpu.nvml.placement import AdmissionTimedOut, PlacementError
    from fedgpu.output import OutputError

    return [
        ChildRaised("ValueError", "bad batch", "Traceback ...", pid=12, original=ValueError("bad batch")),
        ChildDied(-9, pid=13, detail="its peak RSS was 300 MiB"),
        ChildDied(-15, pid=14, stopped_by="shutting down"),
        ChildDied(None, pid=15),
        ChildTimedOut(60, pid=16),
        ZygoteError("cannot reach the zygote", pid=None),
        ZygoteUntrusted("not our zygote"),
        PlacementError("exceeds the largest GPU"),
        AdmissionTimedOut("no GPU had 600 MiB free"),
        ServerError("SuperLink not ready"),
        TooFewNodes(3, 4, 300, 1),
        OutputError("/run/metrics.csv", OSError(28, "No space left on device")),
        FedgpuError("plain"),
    ]


@pytest.mark.parametrize("error", _all_errors(), ids=lambda error: type(error).__name__)
def test_every_error_shares_one_base_and_survives_pickling(error):
    import pickle

    from fedgpu.errors import FedgpuError

    assert isinstance(error, FedgpuError)
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and str(copy) == str(error)
    fields = {k: v for k, v in vars(error).items() if k != "original"}
    assert {k: v for k, v in vars(copy).items() if k != "original"} == fields
    for name in ("kind", "detail", "reason", "pid", "returncode", "timeout", "path"):
        if hasattr(error, name):
            assert getattr(copy, name) == getattr(error, name), name
