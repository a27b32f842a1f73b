"""The ``spawn`` and ``none`` launchers: a fresh interpreter per call, or the calling process itself.

Each is a ``Launcher`` (``core``): ``start(env)`` hands back a ``Child``
with the same operations (exchange the call, wait for its exit, stop its
group, reap it). The ``zygote`` launcher is ``fedgpu.isolation.zygote``'s.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

from fedgpu.isolation import wire
from fedgpu.isolation.exchange import SocketChild
from fedgpu.isolation.procs import (
    child_environment,
    exited_within,
    open_sentinel,
    signal_group,
)
from fedgpu.names import CALL_MARKER


class SpawnedChild(SocketChild):
    """A fresh interpreter running ``fedgpu.isolation.child``.

    ``stop`` may come from another thread (``Isolator.shutdown``) while the
    calling thread finishes: both take the lock, and nothing is done twice.
    """

    def __init__(self, popen: subprocess.Popen, sock: socket.socket) -> None:
        self.popen = popen
        self.pid = popen.pid
        self.sock = sock
        self._sentinel = open_sentinel(self.pid)
        self._lock = threading.Lock()
        self._returncode: int | None = None
        self._reaped = False
        self.stopped_by: str | None = None
        self.max_rss_kib = 0  # from the kernel once reaped (kept across exec: an upper bound)

    def wait_exit(self, timeout: float | None) -> bool:
        return self._reaped or exited_within(self.pid, self._sentinel, timeout)

    def finish(self) -> int | None:
        with self._lock:
            if not self._reaped:
                self._reaped = True
                # The leader is at worst a zombie here, so its group id is still ours.
                signal_group(self.pid, signal.SIGKILL)
                try:
                    _, status, usage = os.wait4(self.pid, 0)
                    self._returncode = self.popen.returncode = os.waitstatus_to_exitcode(status)
                    self.max_rss_kib = usage.ru_maxrss
                except ChildProcessError:
                    self._returncode = None  # someone else reaped it: its status is unknown
                if self._sentinel is not None:
                    os.close(self._sentinel)
                    self._sentinel = None
                self.sock.close()
            return self._returncode

    @property
    def sentinel(self) -> int | None:
        return self._sentinel


class SpawnLauncher:
    """``spawn``: a new Python process per call; nothing is inherited but env."""

    name = "spawn"

    def close(self) -> None:
        pass

    def start(self, env: Mapping[str, str]) -> SpawnedChild:
        parent_sock, child_sock = wire.socketpair()
        try:
            popen = subprocess.Popen(
                [sys.executable, "-m", "fedgpu.isolation.child", str(child_sock.fileno()), str(os.getpid())],
                env=child_environment(env),
                pass_fds=(child_sock.fileno(),),
                start_new_session=True,  # its own group: stoppable with its children
                stdin=subprocess.DEVNULL,
            )
        except BaseException:
            parent_sock.close()
            raise
        finally:
            child_sock.close()
        return SpawnedChild(popen, parent_sock)


class InProcessChild:
    """The calling process standing in for a child (mode ``none``): the call runs here, in this thread.

    Its value comes back as the very object, its exception as it was raised;
    there is no process of its own to wait for, stop or reap.
    """

    sentinel = None
    stopped_by: str | None = None

    def __init__(self, env: Mapping[str, str]) -> None:
        self.pid = os.getpid()
        self.max_rss_kib = 0
        # The call's own variables; a marker would tag what this process starts long after the call.
        self.env = {name: value for name, value in env.items() if name != CALL_MARKER}

    def exchange(self, call: tuple, timeout: float | None) -> Any:
        fn, args, kwargs = call
        os.environ.update(self.env)  # the baseline: whatever the call sets or allocates stays with this process
        started = time.perf_counter()
        value = fn(*args, **kwargs)  # no timeout: nothing could stop it
        work_seconds = time.perf_counter() - started
        self.max_rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return ("ok", value, {"work_seconds": work_seconds, "max_rss_kib": self.max_rss_kib})

    def wait_exit(self, timeout: float | None) -> bool:
        return True

    def stop(self, grace: float) -> None:
        pass

    def finish(self) -> int | None:
        return 0


class InProcessLauncher:
    """``none``: no child at all; each call runs in the calling process (the naive baseline)."""

    name = "none"

    def start(self, env: Mapping[str, str]) -> InProcessChild:
        return InProcessChild(env)

    def close(self) -> None:
        pass
