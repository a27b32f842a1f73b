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

import os
import resource
import selectors
import signal
import socket
import time
from collections.abc import Mapping, Sequence
from typing import Any

from fedgpu.isolation.procs import (
    children_of,
    exited_within,
    kill_orphan,
    open_sentinel,
    signal_group,
    stop_groups,
)
from fedgpu.isolation.unix_paths import unix_address
from fedgpu.isolation.zygote.forked import become_child, become_spare, fork
from fedgpu.isolation.zygote.handshake import (
    ACCEPTS_PER_ROUND,
    HANDSHAKE_SECONDS,
    STATES,
    Drop,
    Pending,
    advance_handshake,
    max_pending,
    try_send,
)
from fedgpu.isolation.zygote.protocol import (
    FDS_MARK,
    KEY_NAME,
    READY_NAME,
    SOCKET_NAME,
    ZygoteError,
    encode_frame,
    peer_uid,
)

# Connections the kernel queues for accept (capped by net.core.somaxconn): a caller that
# finds the queue full fails at once, so it is long enough to outlast a flood's burst.
BACKLOG = 4096
SWEEP_SECONDS = 1.0  # how often children without a pidfd and stray orphans are looked for


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
        # (pid, channel, pidfd) of each spare, oldest (most primed) first
        self.spares: list[tuple[int, socket.socket, int | None]] = []
        self.pid = os.getpid()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with unix_address(os.path.join(directory, SOCKET_NAME)) as address:
                self.listener.bind(address)
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
            request = advance_handshake(pending, self.key)
        except (Drop, OSError, ValueError):
            self._drop(pending)
            return
        if request is None:
            return
        del self.pending[pending.fd]
        self.selector.unregister(pending.conn)
        self._start_call(pending.conn, pending.fds, request)
        pending.fds = []

    def _start_call(self, conn: socket.socket, fds: list[int], request: dict[str, Any]) -> None:
        try:
            pid, pidfd = self._assign_spare(request, fds)
            if pid is None:
                pid = self._fork(request, fds, conn)
                pidfd = open_sentinel(pid)
        except Exception as err:  # noqa: BLE001 - one bad call must not stop the zygote
            try_send(conn, {"refused": f"{type(err).__name__}: {err}"})
            conn.close()
            return
        finally:
            for fd in fds:
                os.close(fd)
        self.children[pid] = (conn, pidfd)
        if pidfd is not None:
            self.selector.register(pidfd, selectors.EVENT_READ, ("exited", pid))
        if try_send(conn, {"started": pid}):
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
        pid = fork()
        if pid == 0:
            ours.close()
            become_spare(self, theirs)  # never returns
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

    def _fork(self, request: Mapping[str, Any], fds: list[int], conn: socket.socket) -> int:
        pid = fork()
        if pid == 0:
            become_child(self, request, conn, *fds)  # never returns
        return pid

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
        try_send(conn, {"exited": pid, "returncode": returncode, "max_rss_kib": max_rss_kib})
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
