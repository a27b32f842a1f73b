"""The parent's side of one call through a child's socket: send it, wait for the reply.

Shared by the children that run in processes of their own (spawned, or
forked by the zygote). The child's answer (``serve.serve_one_call``) is
``(status, *body, facts)``; the child may also die first, which its
sentinel (or the socket's end) tells.
"""

from __future__ import annotations

import select
import sys
import time
from typing import Any

from fedgpu.isolation import wire
from fedgpu.isolation.errors import ChildTimedOut, IsolationError
from fedgpu.isolation.facts import registered_facts
from fedgpu.isolation.procs import stop_group


def exchange_over_socket(child: Any, call: tuple, timeout: float | None) -> Any:
    """Send ``(fn, args, kwargs)`` to ``child`` (its ``sock``, ``pid``, ``sentinel``).

    Returns its reply, or None if it exited without one.

    Raises ChildTimedOut past ``timeout`` seconds.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        child.sock.settimeout(timeout)
        wire.send_object(child.sock, list(sys.path))  # first: the call's modules are found by reference
        wire.send_object(child.sock, (*call, registered_facts()))
    except TimeoutError:
        raise ChildTimedOut(timeout, pid=child.pid) from None
    except (BrokenPipeError, ConnectionResetError):
        pass  # it died before reading everything: the wait below says how
    return _await_reply(child, deadline, timeout)


def _await_reply(child: Any, deadline: float | None, timeout: float | None) -> Any:
    """The child's reply, or None if it exited without one."""
    poller = select.poll()
    poller.register(child.sock.fileno(), select.POLLIN)
    sentinel = child.sentinel
    if sentinel is not None:
        poller.register(sentinel, select.POLLIN)
    while True:
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise ChildTimedOut(timeout, pid=child.pid)
        events = dict(poller.poll(None if remaining is None else int(remaining * 1000) + 1))
        if child.sock.fileno() in events:
            try:
                child.sock.settimeout(remaining)
                return wire.recv_object(child.sock)
            except TimeoutError:
                raise ChildTimedOut(timeout, pid=child.pid) from None
            except (EOFError, ConnectionResetError):
                return None
            except Exception as err:  # e.g. a result of a class we cannot import
                raise IsolationError(
                    f"cannot load the result of child (pid {child.pid}): {err!r}", pid=child.pid
                ) from err
        elif sentinel is not None and sentinel in events:
            return None


class SocketChild:
    """What every child in a process of its own shares: its call goes over ``sock``, it stops with its group.

    A subclass sets ``pid``, ``sock`` and ``_lock`` and defines ``wait_exit``;
    ``stop`` may come from another thread while the calling thread finishes:
    both take the lock.
    """

    pid: int

    def exchange(self, call: tuple, timeout: float | None) -> Any:
        return exchange_over_socket(self, call, timeout)

    def wait_exit(self, timeout: float | None) -> bool:
        raise NotImplementedError

    def stop(self, grace: float) -> None:
        with self._lock:
            if not self.wait_exit(0):
                stop_group(self.pid, grace, self.wait_exit)
