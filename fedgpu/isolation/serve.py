"""What a child does with its one call, whatever started it (spawn, fork)."""

from __future__ import annotations

import logging
import os
import resource
import socket
import sys
import time
import traceback
from typing import Any

from multiprocess.reduction import ForkingPickler

from fedgpu.isolation import wire
from fedgpu.isolation.facts import gather_facts
from fedgpu.isolation.procs import kill_descendants


def serve_one_call(sock: socket.socket) -> None:
    """Receive (sys.path, call), run it, send the outcome with its facts, and exit the process."""
    try:
        sys.path[:] = wire.recv_object(sock)  # before unpickling: modules by reference
        fn, args, kwargs, fact_hooks = wire.recv_object(sock)
    except EOFError:
        os._exit(70)  # the parent went away before sending a call
    started = time.perf_counter()
    try:
        reply: tuple[Any, ...] = ("ok", fn(*args, **kwargs))
    except BaseException as exc:  # noqa: BLE001 - every failure goes to the parent
        reply = _error_reply(exc)
    work_seconds = time.perf_counter() - started
    facts = {"work_seconds": work_seconds, "max_rss_kib": _max_rss_kib()}  # the RSS before a hook loads anything
    facts = {**gather_facts(fact_hooks), **facts}
    try:
        wire.send_object(sock, (*reply, facts))
    except Exception as exc:  # noqa: BLE001 - e.g. an unpicklable result
        wire.send_object(sock, (*_error_reply(exc, "could not send the result: "), facts))
    _exit_now(0)


def _error_reply(exc: BaseException, prefix: str = "") -> tuple[Any, ...]:
    """("err", type name, message, formatted traceback, (module, pickled exception))."""
    text = "".join(traceback.format_exception(exc))
    # Pickled separately: the parent unpickles it only if it already has the
    # exception's module, so a torch error never makes the parent import torch.
    try:
        pickled: tuple[str, bytes] | None = (type(exc).__module__, bytes(ForkingPickler.dumps(exc)))
    except Exception:  # noqa: BLE001 - send what can be sent
        pickled = None
    return ("err", type(exc).__qualname__, prefix + str(exc), text, pickled)


def _max_rss_kib() -> int:
    # VmHWM starts afresh at exec; ru_maxrss would carry the peak of the parent
    # we were forked from (a large parent would show as a large child).
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _exit_now(code: int) -> None:
    # os._exit: a stray non-daemon thread in user code must not keep a
    # finished child (and its GPU memory) alive; nor may anything it started.
    kill_descendants()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    os._exit(code)
