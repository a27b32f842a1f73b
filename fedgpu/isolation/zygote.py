"""The zygote: a warm, single-threaded process that forks one child per call.

Started once per host (``python -m fedgpu.isolation.zygote --dir DIR ...``), it
imports what the calls will need and exercises the CPU paths once (so the lazy
imports behind the first optimizer step are paid here, not per call), but it
never initialises CUDA: a process that has cannot fork usable children. Then it
serves a Unix socket in a private directory (0700, socket 0600) and accepts only
its own user who also proves knowledge of the key in that directory.

Each call is one control connection. The caller passes the child's end of its
data socketpair and its stdout/stderr (SCM_RIGHTS), plus its environment and
working directory; the zygote forks a child that becomes a session leader with
the caller's environment and serves the call over the passed socket, so data
never goes through the zygote. The zygote reaps the child, kills what is left
of its process group, and reports the exit status and peak RSS on the control
connection. A caller that goes away takes its child with it; the zygote dies
with its parent (the launcher, or the client node that started a private one).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import hmac
import importlib
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from typing import Any, Mapping, Sequence

from fedgpu.isolation import wire
from fedgpu.isolation.errors import IsolationError
from fedgpu.isolation.procs import die_with_parent, pythonpath_with_package, signal_group, wait_readable

SOCKET_NAME = "zygote.sock"
KEY_NAME = "key"
READY_NAME = "ready"  # written (atomically) once warm; holds the zygote's pid
ENV_VAR = "FEDGPU_ZYGOTE"  # a shared zygote's directory, for Isolator("zygote")
CHALLENGE_BYTES = 32

# Libraries whose helper threads a fork would not carry into the child are
# kept single-threaded in the zygote; children set their own torch threads.
SINGLE_THREADED_ENV = {
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "JE_ARROW_MALLOC_CONF": "background_thread:false",  # pyarrow's jemalloc
}


class ZygoteError(IsolationError):
    """The zygote could not be reached, refused us, or could not fork."""


def _digest(key: bytes, challenge: bytes) -> bytes:
    return hmac.new(key, challenge, hashlib.sha256).digest()


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError("connection closed")
        data += chunk
    return data


# -- the zygote process ------------------------------------------------------


def call_warm_up(spec: str) -> None:
    """Import ``module`` or call ``module:function`` / ``module:function=ARG``."""
    ref, _, arg = spec.partition("=")
    module_name, _, function_name = ref.partition(":")
    module = importlib.import_module(module_name)
    if function_name:
        function = getattr(module, function_name)
        function(arg) if arg else function()


def native_threads() -> list[str]:
    """Names of this process's threads (the main thread included)."""
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as comm:
                names.append(comm.read().strip())
        except OSError:
            pass
    return names


def assert_fork_safe() -> None:
    """Refuse to serve from a process that initialised CUDA or runs threads."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        raise ZygoteError("CUDA was initialised in the zygote; its forked children could not use the GPU")
    if threading.active_count() != 1:
        raise ZygoteError(f"the zygote must be single-threaded before forking, found {threading.enumerate()}")
    threads = native_threads()
    if len(threads) != 1:
        raise ZygoteError(f"the zygote must be single-threaded before forking; native threads: {threads}")


class ZygoteServer:
    """The serving loop; every method runs in the zygote's only thread."""

    def __init__(self, directory: str, key: bytes, grace: float = 3.0, primers: Sequence[str] = ()) -> None:
        self.directory = directory
        self.key = key
        self.grace = grace
        # A spare child is forked ahead of the next call and runs the primers
        # (the warm-ups that call something) once: the fork and the copy-on-write
        # faults of the first training step are paid before the call arrives.
        self.primers = list(primers)
        self.spare: tuple[int, socket.socket, int | None] | None = None  # pid, channel, pidfd
        self.pid = os.getpid()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(os.path.join(directory, SOCKET_NAME))
        os.chmod(os.path.join(directory, SOCKET_NAME), 0o600)
        self.listener.listen(128)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ, ("accept", 0))
        self.children: dict[int, tuple[socket.socket, int | None]] = {}  # pid -> (control, pidfd)

    def serve_forever(self) -> None:
        while True:
            # The timeout sweeps children whose pidfd could not be opened.
            for key, _ in self.selector.select(timeout=1.0):
                kind, pid = key.data
                if kind == "accept":
                    self._accept()
                elif kind == "exited":
                    self._reap(pid)
                elif kind == "caller":
                    self._caller_gone(pid)
                elif kind == "spare-exited":
                    self._spare_died()
            for pid, (_, pidfd) in list(self.children.items()):
                if pidfd is None and os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT):
                    self._reap(pid)

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        fds: list[int] = []
        try:
            conn.settimeout(5.0)  # a stuck caller must not stall the others for long
            if not self._authenticate(conn):
                conn.close()
                return
            _, fds, _, _ = socket.recv_fds(conn, 1, 3)
            request = wire.recv_object(conn)
            if len(fds) != 3:
                raise ValueError(f"expected 3 file descriptors, got {len(fds)}")
            pid, pidfd = self._assign_spare(request, fds)
            if pid is None:
                pid = self._fork(request, fds, conn)
        except Exception as err:  # noqa: BLE001 - one bad caller must not stop the zygote
            try:
                wire.send_object(conn, ("refused", f"{type(err).__name__}: {err}"))
            except Exception:  # noqa: BLE001
                pass
            conn.close()
            return
        finally:
            for fd in fds:
                os.close(fd)
        if pidfd is None:
            pidfd = _open_pidfd(pid)
        self.children[pid] = (conn, pidfd)
        if pidfd is not None:
            self.selector.register(pidfd, selectors.EVENT_READ, ("exited", pid))
        try:
            wire.send_object(conn, ("started", pid))
        except OSError:
            signal_group(pid, signal.SIGKILL)  # its caller is gone already
        else:
            self.selector.register(conn, selectors.EVENT_READ, ("caller", pid))
        if self.spare is None and self.primers:
            self.fork_spare()  # after answering: the caller does not wait for it

    def fork_spare(self) -> None:
        ours, theirs = socket.socketpair()
        pid = _fork()
        if pid == 0:
            ours.close()
            self._become_spare(theirs)  # never returns
        theirs.close()
        pidfd = _open_pidfd(pid)
        if pidfd is not None:
            self.selector.register(pidfd, selectors.EVENT_READ, ("spare-exited", pid))
        self.spare = (pid, ours, pidfd)

    def _assign_spare(self, request: Mapping[str, Any], fds: list[int]) -> tuple[int | None, int | None]:
        """Hand the call to the spare: (its pid, its pidfd), or (None, None) to fork afresh."""
        if self.spare is None:
            return None, None
        pid, channel, pidfd = self.spare
        self.spare = None
        if pidfd is not None:
            self.selector.unregister(pidfd)
        try:
            socket.send_fds(channel, [b"F"], fds)
            wire.send_object(channel, request)
        except OSError:  # it died meanwhile: reap it, fork afresh
            self._discard_spare(pid, channel, pidfd)
            return None, None
        channel.close()
        return pid, pidfd

    def _spare_died(self) -> None:
        # Not re-forked at once: a spare whose primers fail would die in a loop.
        assert self.spare is not None
        pid, channel, pidfd = self.spare
        self.spare = None
        if pidfd is not None:
            self.selector.unregister(pidfd)
        self._discard_spare(pid, channel, pidfd)

    def _discard_spare(self, pid: int, channel: socket.socket, pidfd: int | None) -> None:
        channel.close()
        signal_group(pid, signal.SIGKILL)
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        if pidfd is not None:
            os.close(pidfd)

    def _become_spare(self, channel: socket.socket) -> None:
        try:
            self._leave_zygote()
            for spec in self.primers:
                call_warm_up(spec)
            _, fds, _, _ = socket.recv_fds(channel, 1, 3)  # until a call arrives
            if len(fds) != 3:
                os._exit(0)  # the zygote closed the channel: it is going away
            request = wire.recv_object(channel)
            channel.close()
        except BaseException:  # noqa: BLE001 - never return into the zygote's loop
            traceback.print_exc()
            os._exit(70)
        self._become_child(request, None, *fds)

    def _leave_zygote(self) -> None:
        """In a freshly forked process: become a call child of the zygote."""
        os.setsid()  # own session and group: stoppable with all it starts
        # Hold no zygote descriptor: a control connection kept open here
        # would hide the zygote's death from its caller.
        self.selector.close()
        self.listener.close()
        for conn, pidfd in self.children.values():
            conn.close()
            if pidfd is not None:
                os.close(pidfd)
        if self.spare is not None:
            self.spare[1].close()
            if self.spare[2] is not None:
                os.close(self.spare[2])
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from fedgpu.isolation.child import become_call_child

        become_call_child(self.pid)

    def _authenticate(self, conn: socket.socket) -> bool:
        """Same user (peer credentials) and knows the key (HMAC of a fresh challenge)."""
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _, uid, _ = struct.unpack("3i", creds)
        challenge = os.urandom(CHALLENGE_BYTES)
        conn.sendall(challenge)
        answer = _recv_exact(conn, hashlib.sha256().digest_size)
        accepted = uid == os.getuid() and hmac.compare_digest(answer, _digest(self.key, challenge))
        conn.sendall(b"\x01" if accepted else b"\x00")
        return accepted

    def _fork(self, request: Mapping[str, Any], fds: list[int], conn: socket.socket) -> int:
        pid = _fork()
        if pid == 0:
            self._become_child(request, conn, *fds)  # never returns
        return pid

    def _become_child(
        self, request: Mapping[str, Any], conn: socket.socket | None, data_fd: int, out_fd: int, err_fd: int
    ) -> None:
        """Serve one call in this forked process (fresh from the zygote, or a spare)."""
        code = 70
        try:
            if conn is not None:  # fresh from the zygote (a spare has done this already)
                conn.close()
                self._leave_zygote()
            os.dup2(out_fd, 1)  # the caller's log, not the zygote's
            os.dup2(err_fd, 2)
            os.close(out_fd)
            os.close(err_fd)
            try:
                os.chdir(request["cwd"])
            except OSError:
                pass
            os.environ.clear()
            os.environ.update(request["env"])
            _reseed()
            from fedgpu.isolation.serve import serve_one_call

            serve_one_call(socket.socket(fileno=data_fd))  # exits the process
        except BaseException:  # noqa: BLE001 - never return into the zygote's loop
            traceback.print_exc()
        finally:
            os._exit(code)

    def _reap(self, pid: int) -> None:
        # The leader is a zombie until reaped, so its group id cannot have
        # been reused: kill what it left behind, then reap it.
        signal_group(pid, signal.SIGKILL)
        try:
            _, status, usage = os.wait4(pid, 0)
            returncode, max_rss_kib = os.waitstatus_to_exitcode(status), usage.ru_maxrss
        except ChildProcessError:
            returncode, max_rss_kib = -signal.SIGKILL, 0
        conn, pidfd = self.children.pop(pid)
        if pidfd is not None:
            self.selector.unregister(pidfd)
            os.close(pidfd)
        try:
            self.selector.unregister(conn)
            wire.send_object(conn, ("exited", pid, returncode, max_rss_kib))
        except (KeyError, ValueError, OSError):
            pass  # the caller had already gone
        conn.close()

    def _caller_gone(self, pid: int) -> None:
        # Callers send nothing after the request: readable means closed.
        conn, _ = self.children[pid]
        self.selector.unregister(conn)
        signal_group(pid, signal.SIGKILL)

    def close(self) -> None:
        """TERM every child's group, wait ``grace``, KILL, reap; remove our files."""
        if self.spare is not None:
            self._discard_spare(*self.spare)
            self.spare = None
        pids = list(self.children)
        for pid in pids:
            signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        for pid in pids:
            _, pidfd = self.children[pid]
            if pidfd is not None:
                wait_readable(pidfd, max(0.0, deadline - time.monotonic()))
            self._reap(pid)
        self.listener.close()
        for name in (READY_NAME, SOCKET_NAME, KEY_NAME):
            try:
                os.unlink(os.path.join(self.directory, name))
            except FileNotFoundError:
                pass
        try:
            os.rmdir(self.directory)  # if nothing else is in it: a dead caller cannot clean up
        except OSError:
            pass


def _fork() -> int:
    for stream in (sys.stdout, sys.stderr):
        stream.flush()  # or the child would print our buffered output again
    return os.fork()


def _open_pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _reseed() -> None:
    """Fresh random state per child, as a spawned one would have.

    ``random`` reseeds itself after fork; NumPy's and torch's global generators
    would otherwise repeat the zygote's stream in every child.
    """
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.seed()  # CUDA generators are seeded lazily: this starts no CUDA


def _on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _write_private(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def serve(directory: str, warm_ups: Sequence[str], parent_pid: int | None) -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, _on_sigterm)
    if parent_pid is not None:
        die_with_parent(parent_pid, signal.SIGTERM)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    if os.stat(directory).st_mode & 0o077:
        raise ZygoteError(f"zygote directory {directory} must be private (mode 0700)")
    started = time.perf_counter()
    for spec in warm_ups:
        call_warm_up(spec)
    assert_fork_safe()
    # Every object alive now is shared with the children copy-on-write. A
    # collection in a child would write to each object's header and copy
    # nearly every page; frozen objects are never traversed.
    gc.collect()
    gc.freeze()
    key = os.urandom(32)
    _write_private(os.path.join(directory, KEY_NAME), key)
    primers = [spec for spec in warm_ups if ":" in spec.partition("=")[0]]
    server = ZygoteServer(directory, key, primers=primers)
    try:
        ready = os.path.join(directory, READY_NAME)
        _write_private(ready + ".tmp", str(os.getpid()).encode())
        os.rename(ready + ".tmp", ready)  # callers never see a half-written file
        print(
            f"[fedgpu] zygote {os.getpid()} ready in {time.perf_counter() - started:.1f} s "
            f"at {directory} (warm-ups: {', '.join(warm_ups) or 'none'})",
            flush=True,
        )
        if primers:
            server.fork_spare()
        server.serve_forever()
    finally:
        server.close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fedgpu.isolation.zygote", description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True, help="Private directory (0700) for the socket and the key.")
    parser.add_argument("--parent-pid", type=int, default=None, help="Exit when this process (our parent) dies.")
    parser.add_argument("warm_ups", nargs="*", help="module, module:function or module:function=ARG, in order.")
    args = parser.parse_args(argv)
    for name, value in SINGLE_THREADED_ENV.items():
        os.environ.setdefault(name, value)  # before anything imports the libraries
    try:
        serve(args.dir, args.warm_ups, args.parent_pid)
    except ZygoteError as err:
        print(f"fedgpu zygote: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


# -- the caller's side -------------------------------------------------------


class ZygoteChild:
    """A child forked by the zygote, as the Isolator drives it.

    The control connection is the child's sentinel: the zygote writes the exit
    status there once it has reaped the child (or the connection closes if the
    zygote itself dies).
    """

    def __init__(self, pid: int, sock: socket.socket, control: socket.socket, zygote_pid: int) -> None:
        self.pid = pid
        self.sock = sock
        self.control = control
        self.zygote_pid = zygote_pid
        self.max_rss_kib = 0
        self._returncode: int | None = None
        self._lock = threading.Lock()

    @property
    def sentinel(self) -> int:
        return self.control.fileno()

    def wait_exit(self, timeout: float | None) -> bool:
        if self._returncode is not None:
            return True
        if not wait_readable(self.control.fileno(), timeout):
            return False
        try:
            self.control.settimeout(5.0)
            _, _, self._returncode, self.max_rss_kib = wire.recv_object(self.control)
        except (EOFError, OSError):
            # The zygote died; the child got its parent-death signal.
            self._returncode = -signal.SIGKILL
        return True

    def stop(self, grace: float) -> None:
        with self._lock:
            if self._returncode is None and not self.wait_exit(0):
                signal_group(self.pid, signal.SIGTERM)
                if not self.wait_exit(grace):
                    signal_group(self.pid, signal.SIGKILL)

    def finish(self) -> int:
        with self._lock:
            if self._returncode is None and not self.wait_exit(0):
                signal_group(self.pid, signal.SIGKILL)
                if not self.wait_exit(30.0):
                    self._returncode = -signal.SIGKILL  # the zygote is wedged; its reaper owns the rest
            self.sock.close()
            self.control.close()
            return self._returncode


def read_key(directory: str) -> bytes:
    with open(os.path.join(directory, KEY_NAME), "rb") as key_file:
        return key_file.read()


def connect(directory: str, key: bytes | None, timeout: float = 30.0) -> tuple[socket.socket, bool]:
    """An authenticated control connection; (socket, accepted)."""
    control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        control.settimeout(timeout)
        control.connect(os.path.join(directory, SOCKET_NAME))
        challenge = _recv_exact(control, CHALLENGE_BYTES)
        control.sendall(_digest(key, challenge) if key is not None else os.urandom(hashlib.sha256().digest_size))
        accepted = _recv_exact(control, 1) == b"\x01"
    except BaseException:
        control.close()
        raise
    return control, accepted


class ZygoteLauncher:
    """``zygote``: fork each call from a warm zygote (shared, or our own).

    With ``directory`` (or ``$FEDGPU_ZYGOTE``) it uses the host's shared zygote;
    otherwise it starts a private one, warmed with ``warm_ups``, that lives as
    long as this launcher (and dies with this process).
    """

    name = "zygote"

    def __init__(
        self,
        directory: str | None = None,
        *,
        warm_ups: Sequence[str] = (),
        ready_timeout: float = 300.0,
    ) -> None:
        self.ready_timeout = ready_timeout
        self._private: subprocess.Popen | None = None
        self._key: bytes | None = None
        self._zygote_pid = 0
        self._lock = threading.Lock()
        directory = directory or os.environ.get(ENV_VAR) or None
        if directory is None:
            directory = tempfile.mkdtemp(prefix="fedgpu-zygote-")  # 0700
            self._private = subprocess.Popen(
                [sys.executable, "-m", "fedgpu.isolation.zygote", "--dir", directory, "--parent-pid", str(os.getpid()), *warm_ups],
                env={**os.environ, "PYTHONPATH": pythonpath_with_package()},
                start_new_session=True,
                stdin=subprocess.DEVNULL,
            )
        self.directory = directory

    def _wait_ready(self) -> None:
        with self._lock:
            if self._key is not None:
                return
            ready = os.path.join(self.directory, READY_NAME)
            deadline = time.monotonic() + self.ready_timeout
            while not os.path.exists(ready):
                if self._private is not None and self._private.poll() is not None:
                    raise ZygoteError(f"the private zygote exited with code {self._private.returncode} before it was ready")
                if time.monotonic() > deadline:
                    raise ZygoteError(f"no zygote ready at {self.directory} after {self.ready_timeout:g} s")
                time.sleep(0.05)
            with open(ready) as pid_file:
                self._zygote_pid = int(pid_file.read())
            self._key = read_key(self.directory)

    def start(self, env: Mapping[str, str]) -> ZygoteChild:
        self._wait_ready()
        try:
            control, accepted = connect(self.directory, self._key)
        except (OSError, EOFError) as err:
            raise ZygoteError(f"cannot reach the zygote at {self.directory}: {err}") from err
        if not accepted:
            control.close()
            raise ZygoteError(f"the zygote at {self.directory} refused our key")
        parent_sock, child_sock = wire.socketpair()
        try:
            socket.send_fds(control, [b"F"], [child_sock.fileno(), sys.stdout.fileno(), sys.stderr.fileno()])
            wire.send_object(control, {"env": dict(env), "cwd": os.getcwd()})
            reply = wire.recv_object(control)
        except BaseException as err:
            parent_sock.close()
            control.close()
            if isinstance(err, (OSError, EOFError)):
                raise ZygoteError(f"the zygote at {self.directory} did not start a child: {err}") from err
            raise
        finally:
            child_sock.close()
        if reply[0] != "started":
            parent_sock.close()
            control.close()
            raise ZygoteError(f"the zygote refused to fork: {reply[1]}")
        return ZygoteChild(reply[1], parent_sock, control, self._zygote_pid)

    def close(self) -> None:
        """Stop a private zygote (TERM, grace, KILL) and remove its directory."""
        if self._private is None:
            return
        from fedgpu.isolation.procs import stop_group

        stop_group(self._private.pid, 5.0, lambda timeout: _wait_popen(self._private, timeout))
        self._private.wait()
        import shutil

        shutil.rmtree(self.directory, ignore_errors=True)
        self._private = None


def _wait_popen(popen: subprocess.Popen, timeout: float) -> bool:
    try:
        popen.wait(timeout)
        return True
    except subprocess.TimeoutExpired:
        return False


if __name__ == "__main__":
    main()
