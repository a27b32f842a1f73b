"""The zygote process: warm, single-threaded, forks one child per call.

Started once per host (``python -m fedgpu.isolation.zygote --dir DIR ...``), it
imports what the calls will need and exercises the CPU paths once (so the lazy
imports behind the first optimizer step are paid here, not per call), but it
never initialises CUDA: a process that has cannot fork usable children.

It serves its socket from one thread without ever blocking on a caller: every
connection is a small state machine (handshake, descriptors, request) driven by
the selector and dropped at a short deadline, so idle, slow or garbage
connections cost a legitimate call nothing. A call's child becomes a session
leader with the caller's environment and serves the call over the socket the
caller passed, so data never goes through the zygote. The zygote is a child
subreaper: whatever a child started, even in a session of its own, comes back
to the zygote when the child exits and is killed there.
"""

from __future__ import annotations

import gc
import importlib
import os
import resource
import selectors
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedgpu.isolation.procs import (
    children_of,
    die_with_parent,
    exited_within,
    kill_orphan,
    open_sentinel,
    set_child_subreaper,
    signal_group,
    stop_groups,
)
from fedgpu.isolation.zygote.protocol import (
    ACCEPTED,
    FDS_MARK,
    FRAME_HEADER,
    HELLO_BYTES,
    KEY_NAME,
    MAGIC,
    MAX_FRAME_BYTES,
    NONCE_BYTES,
    PROOF_BYTES,
    READY_NAME,
    SOCKET_NAME,
    ZygoteError,
    caller_proof,
    check_private_dir,
    decode_frame,
    encode_frame,
    peer_uid,
    same,
    zygote_proof,
)
from fedgpu.names import ZYGOTE_SPARES_ENV

HANDSHAKE_SECONDS = 2.0  # accept -> complete request; a real caller needs milliseconds
MAX_DESCRIPTORS = 65536  # the soft RLIMIT_NOFILE the zygote raises itself to (at most its hard limit)
MAX_SPARES = 64  # each is a primed process: its private pages count
DESCRIPTOR_HEADROOM = 128  # for the listener, the selector, the spare, stdio, imported libraries
# Connections the kernel queues for accept (capped by net.core.somaxconn): a caller that
# finds the queue full fails at once, so it is long enough to outlast a flood's burst.
BACKLOG = 4096
ACCEPTS_PER_ROUND = 64  # then the connections already accepted are served before more are taken
# Handshake states, least progress first: the first to go when room is needed.
STATES = ("hello", "proof", "fds", "frame")
SWEEP_SECONDS = 1.0  # how often children without a pidfd and stray orphans are looked for

# Libraries whose helper threads a fork would not carry into the child are
# kept single-threaded in the zygote; children set their own torch threads.
SINGLE_THREADED_ENV = {
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "JE_ARROW_MALLOC_CONF": "background_thread:false",  # pyarrow's jemalloc
}


def call_warm_up(spec: str) -> bool:
    """Import ``module`` or call ``module:function`` / ``module:function=ARG``; whether it was done.

    ``?spec``: the same, but a failure is only reported (and False returned): a warm-up
    that would be nice to have must not cost the zygote (its children import it themselves).
    """
    if spec.startswith("?"):
        try:
            return call_warm_up(spec[1:])
        except Exception as err:  # noqa: BLE001 - optional by request
            print(f"[fedgpu] zygote: optional warm-up {spec[1:]} failed, skipped: {err!r}", file=sys.stderr, flush=True)
        return False
    ref, _, arg = spec.partition("=")
    module_name, _, function_name = ref.partition(":")
    module = importlib.import_module(module_name)
    if function_name:
        function = getattr(module, function_name)
        function(arg) if arg else function()
    return True


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


def prepare_directory(directory: str) -> None:
    """Create the zygote's directory (0700) or check it is ours and private.

    A socket left by a zygote that died (nobody listens) is removed with the
    dead zygote's key and ready file; a live zygote there is a refusal.
    """
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError as err:
        raise ZygoteError(f"cannot create {directory}: {err.strerror or err}") from None
    check_private_dir(directory)
    path = os.path.join(directory, SOCKET_NAME)
    if os.path.lexists(path):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(2.0)
            probe.connect(path)
        except OSError:
            pass  # nobody listens: a dead zygote's socket
        else:
            raise ZygoteError(f"a zygote is already serving {directory} (pid {_ready_pid(directory) or 'unknown'})")
        finally:
            probe.close()
    for name in (READY_NAME, KEY_NAME, SOCKET_NAME):
        try:
            os.unlink(os.path.join(directory, name))
        except FileNotFoundError:
            pass


def _ready_pid(directory: str) -> int | None:
    try:
        with open(os.path.join(directory, READY_NAME)) as ready:
            return int(ready.read())
    except (OSError, ValueError):
        return None


def max_pending(descriptors: int) -> int:
    """Handshakes held at once with this many descriptors: half of what the headroom leaves.

    The other half is for the calls: each running one holds its control
    connection and a pidfd, and a handshake in its last state holds the
    caller's three descriptors too.
    """
    return max(4 * ACCEPTS_PER_ROUND, (descriptors - DESCRIPTOR_HEADROOM) // 2)


@dataclass
class Pending:
    """A connection between accept and its complete request; nothing is trusted yet."""

    conn: socket.socket
    deadline: float
    fd: int = -1  # the key in ZygoteServer.pending (conn.fileno() is -1 once closed)
    state: str = "hello"  # hello -> proof -> fds -> frame
    buffer: bytearray = field(default_factory=bytearray)
    caller_nonce: bytes = b""
    zygote_nonce: bytes = b""
    fds: list[int] = field(default_factory=list)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        self.conn.close()


class Drop(Exception):
    """This connection is done for: close it, serve the others."""


class ZygoteServer:
    """The serving loop; every method runs in the zygote's only thread."""

    def __init__(self, directory: str, key: bytes, grace: float = 3.0, primers: Sequence[str] = (), spares: int = 1,
                 unprimed_spares: bool = False) -> None:
        self.directory = directory
        self.key = key
        self.grace = grace
        # A spare child is forked ahead of the next call and runs the primers
        # (the warm-ups that call something) once: the fork and the copy-on-write
        # faults of the first training step are paid before the call arrives.
        # As many as calls arrive at once (a simulation's workers): a call finds one primed.
        self.primers = list(primers)
        self.spare_count = max(0, spares)
        self.unprimed_spares = unprimed_spares  # spares even with nothing to prime them with
        self.spares: list[tuple[int, socket.socket, int | None]] = []  # (pid, channel, pidfd), oldest (most primed) first
        self.pid = os.getpid()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.listener.bind(os.path.join(directory, SOCKET_NAME))
        except OSError as err:  # another zygote bound it since prepare_directory
            self.listener.close()
            raise ZygoteError(f"cannot serve at {directory}: {err.strerror or err}") from None
        os.chmod(os.path.join(directory, SOCKET_NAME), 0o600)
        self.listener.listen(BACKLOG)
        self.listener.setblocking(False)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ, ("accept", 0))
        self.pending: dict[int, Pending] = {}  # fd -> connection in its handshake (oldest first)
        self.max_pending = max_pending(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        self.children: dict[int, tuple[socket.socket, int | None]] = {}  # pid -> (control, pidfd)
        self.orphans: dict[int, int | None] = {}  # pid -> pidfd: descendants of finished calls, killed, to reap

    # -- the loop ------------------------------------------------------------

    def serve_forever(self) -> None:
        next_sweep = time.monotonic() + SWEEP_SECONDS
        while True:
            now = time.monotonic()
            oldest = next(iter(self.pending.values()), None)  # in accept order: the first deadline
            timeout = max(0.0, min(next_sweep, oldest.deadline if oldest else next_sweep) - now)
            refill = self._wants_spares() and len(self.spares) < self.spare_count
            ready = self.selector.select(timeout=0 if refill else timeout)
            if refill and not ready and not self.pending:
                # Idle: fork a spare now. Forking a process of ~1 GiB blocks this loop for
                # tens of ms; done while a call waits, the call would wait for it.
                self.fork_spare()
                continue
            for key, _ in ready:
                if self.selector.get_map().get(key.fd) is not key:
                    # Stale: handling an earlier event of this batch unregistered it (a
                    # handshake evicted or finished, a child reaped), and its descriptor
                    # number may already belong to another registration.
                    continue
                kind, ref = key.data
                if kind == "accept":
                    self._accept()
                elif kind == "pending":
                    self._advance(ref)
                elif kind == "exited":
                    self._reap(ref)
                elif kind == "caller":
                    self._caller_gone(ref)
                elif kind == "spare-exited":
                    self._spare_died(ref)
                elif kind == "orphan":
                    self._reap_orphan(ref)
            now = time.monotonic()
            while self.pending:
                pending = next(iter(self.pending.values()))
                if pending.deadline > now:
                    break
                self._drop(pending)
            if now >= next_sweep:
                next_sweep = now + SWEEP_SECONDS
                for pid, (_, pidfd) in list(self.children.items()):
                    if pidfd is None and os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT):
                        self._reap(pid)
                self._sweep_orphans()

    def _accept(self) -> None:
        for _ in range(ACCEPTS_PER_ROUND):
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # out of descriptors: make room from the handshakes
                if not self.pending:
                    return
                self._drop(self._least_advanced())
                continue
            try:
                if peer_uid(conn) != os.geteuid():
                    conn.close()
                    continue
            except OSError:
                conn.close()
                continue
            if len(self.pending) >= self.max_pending:
                self._drop(self._least_advanced())
            conn.setblocking(False)
            pending = Pending(conn, time.monotonic() + HANDSHAKE_SECONDS, conn.fileno())
            self.pending[pending.fd] = pending
            # The event names the connection itself, not its descriptor number (see _advance).
            self.selector.register(conn, selectors.EVENT_READ, ("pending", pending))

    def _least_advanced(self) -> Pending:
        """The handshake to evict: the oldest of those in the earliest state.

        Not simply the oldest: a real caller sends its whole hello at once and
        is past it at its first read, so connections still in "hello" (idle,
        dripping, or a flood's) go before any that proved the key, and a flood
        of them cannot push out a caller in the middle of its handshake.
        """
        oldest = next(iter(self.pending.values()))
        if oldest.state == STATES[0]:
            return oldest  # the common case under a flood, without a scan
        return min(self.pending.values(), key=lambda p: STATES.index(p.state))  # the first of the least advanced

    def _drop(self, pending: Pending) -> None:
        del self.pending[pending.fd]
        self.selector.unregister(pending.conn)
        pending.close()

    def _advance(self, pending: Pending) -> None:
        """Read what this connection sent; move its handshake on; start the call once complete."""
        if self.pending.get(pending.fd) is not pending:
            return  # dropped by an earlier event of the same batch; its fd may be another's now
        try:
            request = self._step(pending)
        except (Drop, OSError, ValueError):
            self._drop(pending)
            return
        if request is None:
            return
        del self.pending[pending.fd]
        self.selector.unregister(pending.conn)
        self._start_call(pending.conn, pending.fds, request)
        pending.fds = []

    def _step(self, pending: Pending) -> dict[str, Any] | None:
        conn = pending.conn
        if pending.state == "fds":
            try:
                data, fds, flags, _ = socket.recv_fds(conn, 1, 3)
            except (BlockingIOError, InterruptedError):
                return None
            pending.fds = list(fds)
            if data != FDS_MARK or len(fds) != 3 or flags & socket.MSG_CTRUNC:
                raise Drop
            pending.state = "frame"
            return None
        wanted = {"hello": HELLO_BYTES, "proof": PROOF_BYTES}.get(pending.state)
        if wanted is None:  # frame: header, then that many bytes
            wanted = FRAME_HEADER.size
            if len(pending.buffer) >= FRAME_HEADER.size:
                (length,) = FRAME_HEADER.unpack_from(pending.buffer)
                if length > MAX_FRAME_BYTES:
                    raise Drop
                wanted += length
        try:
            chunk = conn.recv(wanted - len(pending.buffer))
        except (BlockingIOError, InterruptedError):
            return None
        if not chunk:
            raise Drop  # closed before finishing
        pending.buffer += chunk
        if len(pending.buffer) < wanted:
            return None
        data, pending.buffer = bytes(pending.buffer), bytearray()
        if pending.state == "hello":
            if not data.startswith(MAGIC):
                raise Drop
            pending.caller_nonce = data[len(MAGIC) :]
            pending.zygote_nonce = os.urandom(NONCE_BYTES)
            _send_now(conn, pending.zygote_nonce + zygote_proof(self.key, pending.caller_nonce, pending.zygote_nonce))
            pending.state = "proof"
        elif pending.state == "proof":
            if not same(data, caller_proof(self.key, pending.caller_nonce, pending.zygote_nonce)):
                raise Drop
            _send_now(conn, ACCEPTED)
            pending.state = "fds"
        elif len(data) > FRAME_HEADER.size:  # the whole frame is in
            request = decode_frame(data[FRAME_HEADER.size :])
            if not isinstance(request.get("env"), dict) or not isinstance(request.get("cwd"), str):
                raise Drop
            return request
        else:
            pending.buffer = bytearray(data)  # the header alone: now read the body
        return None

    def _start_call(self, conn: socket.socket, fds: list[int], request: dict[str, Any]) -> None:
        try:
            pid, pidfd = self._assign_spare(request, fds)
            if pid is None:
                pid = self._fork(request, fds, conn)
                pidfd = open_sentinel(pid)
        except Exception as err:  # noqa: BLE001 - one bad call must not stop the zygote
            _try_send(conn, {"refused": f"{type(err).__name__}: {err}"})
            conn.close()
            return
        finally:
            for fd in fds:
                os.close(fd)
        self.children[pid] = (conn, pidfd)
        if pidfd is not None:
            self.selector.register(pidfd, selectors.EVENT_READ, ("exited", pid))
        if _try_send(conn, {"started": pid}):
            self.selector.register(conn, selectors.EVENT_READ, ("caller", pid))
        else:
            signal_group(pid, signal.SIGKILL)  # its caller is gone already
        # The spare it took is replaced once nothing else waits (serve_forever).

    # -- children --------------------------------------------------------------

    def _wants_spares(self) -> bool:
        # Primed, a spare has paid the fork and the first step's copy-on-write before its call comes; unprimed,
        # the fork only: worth it where calls come at once (a simulation's workers ask for them by number).
        return bool(self.primers) or self.unprimed_spares

    def fork_spares(self) -> None:
        """Fork spares up to ``spare_count``."""
        while self._wants_spares() and len(self.spares) < self.spare_count:
            self.fork_spare()

    def fork_spare(self) -> None:
        ours, theirs = socket.socketpair()
        pid = _fork()
        if pid == 0:
            ours.close()
            self._become_spare(theirs)  # never returns
        theirs.close()
        pidfd = open_sentinel(pid)
        if pidfd is not None:
            self.selector.register(pidfd, selectors.EVENT_READ, ("spare-exited", pid))
        self.spares.append((pid, ours, pidfd))

    def _assign_spare(self, request: Mapping[str, Any], fds: list[int]) -> tuple[int | None, int | None]:
        """Hand the call to the spare: (its pid, its pidfd), or (None, None) to fork afresh."""
        if not self.spares:
            return None, None
        pid, channel, pidfd = self.spares.pop(0)
        if pidfd is not None:
            self.selector.unregister(pidfd)
        try:
            socket.send_fds(channel, [FDS_MARK], fds)
            channel.sendall(encode_frame(dict(request)))
        except OSError:  # it died meanwhile: reap it, fork afresh
            self._discard_spare(pid, channel, pidfd)
            return None, None
        channel.close()
        return pid, pidfd

    def _spare_died(self, dead: int) -> None:
        # Not re-forked at once: a spare whose primers fail would die in a loop.
        found = [spare for spare in self.spares if spare[0] == dead]
        if not found:
            return
        self.spares.remove(found[0])
        pid, channel, pidfd = found[0]
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
            data, fds, _, _ = socket.recv_fds(channel, 1, 3)  # until a call arrives
            if data != FDS_MARK or len(fds) != 3:
                os._exit(0)  # the zygote closed the channel: it is going away
            from fedgpu.isolation.zygote.protocol import recv_frame

            request = recv_frame(channel)
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
        for pending in self.pending.values():
            pending.close()
        for conn, pidfd in self.children.values():
            conn.close()
            if pidfd is not None:
                os.close(pidfd)
        for pidfd in self.orphans.values():
            if pidfd is not None:
                os.close(pidfd)
        for _, channel, pidfd in self.spares:
            channel.close()
            if pidfd is not None:
                os.close(pidfd)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from fedgpu.isolation.child import become_call_child

        become_call_child(self.pid)

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
        returncode: int | None = None
        max_rss_kib = 0
        try:
            _, status, usage = os.wait4(pid, 0)
            returncode, max_rss_kib = os.waitstatus_to_exitcode(status), usage.ru_maxrss
        except ChildProcessError:
            pass  # not ours to reap any more: its status is unknown, and is reported so
        conn, pidfd = self.children.pop(pid)
        if pidfd is not None:
            self.selector.unregister(pidfd)
            os.close(pidfd)
        # Its descendants in other sessions came to us (we are their subreaper) as it exited.
        self._sweep_orphans()
        try:
            self.selector.unregister(conn)
        except (KeyError, ValueError):
            pass
        _try_send(conn, {"exited": pid, "returncode": returncode, "max_rss_kib": max_rss_kib})
        conn.close()

    def _caller_gone(self, pid: int) -> None:
        # Callers send nothing after the request: readable means closed.
        conn, _ = self.children[pid]
        self.selector.unregister(conn)
        signal_group(pid, signal.SIGKILL)

    def _sweep_orphans(self) -> None:
        """Kill every child of ours that no call owns: what finished calls left behind."""
        known = set(self.children) | set(self.orphans) | {spare[0] for spare in self.spares}
        for pid in children_of(self.pid):
            if pid in known:
                continue
            kill_orphan(pid)
            pidfd = open_sentinel(pid)
            self.orphans[pid] = pidfd
            if pidfd is not None:
                self.selector.register(pidfd, selectors.EVENT_READ, ("orphan", pid))
        for pid, pidfd in list(self.orphans.items()):
            if pidfd is None:
                self._reap_orphan(pid, block=False)

    def _reap_orphan(self, pid: int, block: bool = True) -> None:
        try:
            done, _ = os.waitpid(pid, 0 if block else os.WNOHANG)
        except ChildProcessError:
            done = pid
        if done != pid:
            return
        pidfd = self.orphans.pop(pid)
        if pidfd is not None:
            self.selector.unregister(pidfd)
            os.close(pidfd)

    def close(self) -> None:
        """TERM every child's group, wait ``grace``, KILL, reap; remove our files."""
        for pending in list(self.pending.values()):
            self._drop(pending)
        for spare in self.spares:
            self._discard_spare(*spare)
        self.spares = []
        stop_groups(self.children, self.grace,
                    exited=lambda pid, timeout: exited_within(pid, self.children[pid][1], timeout))
        for pid in list(self.children):
            self._reap(pid)
        self._sweep_orphans()
        for pid in list(self.orphans):
            self._reap_orphan(pid)
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


def _send_now(conn: socket.socket, data: bytes) -> None:
    """A small write to a non-blocking socket; a peer that cannot take it is dropped."""
    if conn.send(data) != len(data):
        raise Drop


def _try_send(conn: socket.socket, message: dict[str, Any]) -> bool:
    try:
        _send_now(conn, encode_frame(message))
        return True
    except (Drop, OSError):
        return False


def spares_wanted() -> int:
    """Spare children to keep primed: $FEDGPU_ZYGOTE_SPARES (a simulation sets its workers), else one."""
    try:
        return max(0, min(MAX_SPARES, int(os.environ.get(ZYGOTE_SPARES_ENV) or 1)))
    except ValueError:
        return 1


def _fork() -> int:
    for stream in (sys.stdout, sys.stderr):
        stream.flush()  # or the child would print our buffered output again
    return os.fork()


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


def _raise_descriptor_limit() -> None:
    """Raise the soft RLIMIT_NOFILE towards the hard one, to MAX_DESCRIPTORS at most.

    Each caller holds a connection while its child runs, and handshakes wait
    beside them (a flood of idle ones too): do not run out at 1024. Bounded,
    as the children inherit it and some programs walk every possible descriptor.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = MAX_DESCRIPTORS if hard == resource.RLIM_INFINITY else min(hard, MAX_DESCRIPTORS)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError):
            pass


def serve(directory: str, warm_ups: Sequence[str], parent_pid: int | None) -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, _on_sigterm)
    if parent_pid is not None:
        die_with_parent(parent_pid, signal.SIGTERM)
    prepare_directory(directory)
    started = time.perf_counter()
    # What the ready line lists: the warm-ups done, by name (an optional one's "?" is no part of it).
    warmed = [spec.lstrip("?") for spec in warm_ups if call_warm_up(spec)]
    assert_fork_safe()
    # Every object alive now is shared with the children copy-on-write. A
    # collection in a child would write to each object's header and copy
    # nearly every page; frozen objects are never traversed.
    gc.collect()
    gc.freeze()
    set_child_subreaper()  # after the warm-ups: only what calls leave behind comes to us
    _raise_descriptor_limit()
    key = os.urandom(32)
    _write_private(os.path.join(directory, KEY_NAME), key)
    primers = [spec for spec in warm_ups if ":" in spec.lstrip("?").partition("=")[0]]
    server = ZygoteServer(directory, key, primers=primers, spares=spares_wanted(),
                          unprimed_spares=bool(os.environ.get(ZYGOTE_SPARES_ENV)))
    try:
        ready = os.path.join(directory, READY_NAME)
        _write_private(ready + ".tmp", str(os.getpid()).encode())
        os.rename(ready + ".tmp", ready)  # callers never see a half-written file
        print(
            f"[fedgpu] zygote {os.getpid()} ready in {time.perf_counter() - started:.1f} s "
            f"at {directory} (warm-ups: {', '.join(warmed) or 'none'})",
            flush=True,
        )
        server.fork_spares()
        server.serve_forever()
    finally:
        server.close()
