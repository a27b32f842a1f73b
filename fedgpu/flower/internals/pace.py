"""Where fedgpu changes the pace of Flower's own loops (flwr 1.42).

Flower's SuperNode (``flwr.supernode.start_client_internal``) paces itself
with fixed sleeps: 3 s after a pull that found no message, 0.5 s turns while
it waits for the ClientApp's reply and for the reply's content. A message
therefore waits up to 3 s to be picked up and up to 0.5 s to leave, however
short its work. This module swaps that module's ``time`` for a clock whose
``sleep`` waits on events instead:

* a pull that found nothing waits for a doorbell (a datagram the ServerApp
  sends a node once its message, with all its arrays, is on the SuperLink), at
  most Flower's 3 s; with no doorbell, an interval that starts at
  ``FAST_PULL_SECONDS`` after activity and doubles back to Flower's 3 s;
* the wait for a reply tells the task runner a task is there, then waits
  for the runner to say the reply is stored.

Flower's loop keeps every decision (what to pull, when to push); only its
waits change. :func:`loop_contract` reads Flower's source and names any change
of shape, so that another Flower version fails the contract test and runs at
Flower's own pace (with a warning) instead of being patched blindly.

The ServerApp side, :func:`pace_grid`: Flower's HTTP grid pulls replies
within 0.05-0.2 s instead of 3 s, and rings the destination nodes' doorbells
once ``push_messages`` has stored a message and all its objects (ringing
earlier, the nodes would pull objects still in flight, and their retries would
slow the push itself). ``fedgpu.flower.internals.processes`` starts Flower's
SuperLink so that its SuperExec starts every ServerApp this way, ours or a user's.
"""

from __future__ import annotations

import inspect
import os
import select
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from fedgpu.flower.internals.contract import sleep_contract
from fedgpu.isolation.unix_paths import unix_address
from fedgpu.names import PACE_ENV

# Where the doorbells of one host's nodes live (a private directory the launcher makes).
# Set to "flower" to keep Flower's own pace (the benchmarks' "before").

FAST_PULL_SECONDS = 0.1  # the first idle pull after a message; doubles up to Flower's own interval
CONTENT_POLL_SECONDS = 0.02  # a reply's content not yet in the object store (rare)

# The shape of Flower's SuperNode loop this module relies on: (function, seconds)
# of every time.sleep call in the module, and nothing else of ``time`` used.
EXPECTED_SLEEPS = (("start_client_internal", 3), ("_push_messages", 0.5), ("yield_object_contents", 0.5))
# The same for the ServerApp's grid (flwr.superlink.grid.http_grid): 3 s between pulls for replies.
GRID_EXPECTED_SLEEPS = (("send_and_receive", 3),)
REPLY_PULL_SECONDS = (0.05, 0.2)  # the ServerApp's pulls for replies: fast at first, then every 0.2 s
# Flower retries an object not yet there (a message pulled while its arrays are still being
# pushed) after 1 s, doubling; fedgpu's processes start that backoff at 50 ms.
OBJECT_PULL_BACKOFF = (1, 0.05)  # (Flower's initial_backoff, ours)



def loop_contract(module: ModuleType) -> list[str]:
    """What differs in Flower's SuperNode loop from the one :class:`NodePace` paces."""
    problems = sleep_contract(module, EXPECTED_SLEEPS)
    body = inspect.getsource(module.start_client_internal)
    if "while True" not in body or "_push_messages(" not in body or "_pull_and_store_message(" not in body:
        problems.append("start_client_internal no longer loops pull -> _push_messages")
    return problems


def grid_contract(module: ModuleType) -> list[str]:
    """What differs in Flower's ServerApp grid from the one :func:`pace_grid` paces."""
    problems = sleep_contract(module, GRID_EXPECTED_SLEEPS, {"time"})
    push = getattr(getattr(module, "HttpGrid", None), "push_messages", None)
    if push is None or list(inspect.signature(push).parameters) != ["self", "messages"]:
        problems.append("HttpGrid.push_messages(self, messages) is gone or takes other arguments")
    return problems


def _object_pullers() -> list[Callable]:
    from flwr.supercore.inflatable import inflatable_utils

    return [inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree]


def object_pull_contract() -> list[str]:
    """What differs in Flower's object pulls from those :func:`_quicken_object_pulls` changes."""
    flowers, _ = OBJECT_PULL_BACKOFF
    return [f"{fn.__name__} has initial_backoff {(fn.__kwdefaults__ or {}).get('initial_backoff')!r}, "
            f"expected {flowers}"
            for fn in _object_pullers() if (fn.__kwdefaults__ or {}).get("initial_backoff") != flowers]


def _quicken_object_pulls() -> None:
    _, ours = OBJECT_PULL_BACKOFF
    for fn in _object_pullers():
        fn.__kwdefaults__["initial_backoff"] = ours


class NodePace:
    """The events between Flower's SuperNode loop and the task runner of one node."""

    def __init__(self, doorbells: str | None = None) -> None:
        self.task_stored = threading.Event()  # the loop pulled a message: the runner may acquire its task
        self.reply_stored = threading.Event()  # the runner stored the reply: the loop may push it
        self.doorbells = doorbells
        self._bell: socket.socket | None = None
        self._bell_path: Path | None = None
        self._idle_wait = FAST_PULL_SECONDS
        self.idle_waits = 0  # pulls that found nothing
        self.rings = 0  # of which the doorbell ended the wait

    # -- the SuperNode loop's waits -----------------------------------------------

    def idle(self, flower_seconds: float, node_id: int | None) -> bool:
        """After a pull that found no message: until the doorbell rings (True), or the (growing) interval."""
        self.idle_waits += 1
        bell = self._doorbell(node_id)
        if bell is None:
            wait = min(self._idle_wait, flower_seconds)
            self._idle_wait = min(flower_seconds, self._idle_wait * 2)
            time.sleep(wait)
            return False
        # With a doorbell, Flower's own interval: every request costs the SuperLink, and the bell says when.
        if not select.select([bell], [], [], flower_seconds)[0]:
            return False
        self._drain(bell)
        self.rings += 1
        return True

    def awaiting_reply(self, flower_seconds: float) -> None:
        """The loop pulled a message and waits for its reply: wake the runner, wait for the reply."""
        self._idle_wait = FAST_PULL_SECONDS
        self.task_stored.set()
        if self.reply_stored.wait(flower_seconds):
            self.reply_stored.clear()

    def reply_pushed(self) -> None:
        self.reply_stored.set()

    # -- the doorbell -----------------------------------------------------------------

    def _doorbell(self, node_id: int | None) -> socket.socket | None:
        if self._bell is not None or not self.doorbells or node_id is None:
            return self._bell
        path = Path(self.doorbells) / str(node_id)
        bell = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            path.unlink(missing_ok=True)
            with unix_address(str(path)) as address:
                bell.bind(address)
        except OSError:  # no doorbell: this node polls at the growing interval
            bell.close()
            self.doorbells = None
            return None
        bell.setblocking(False)
        self._bell, self._bell_path = bell, path
        return bell

    @staticmethod
    def _drain(bell: socket.socket) -> None:
        try:
            while bell.recv(64):
                pass
        except (BlockingIOError, OSError):
            pass

    def summary(self) -> str:
        bell = f"doorbell {self._bell_path}" if self._bell_path else "no doorbell"
        return f"SuperNode loop: {self.idle_waits} idle waits, {self.rings} ended by the doorbell ({bell})"

    def close(self) -> None:
        if self._bell is not None:
            self._bell.close()
            if self._bell_path is not None:
                self._bell_path.unlink(missing_ok=True)
            self._bell = None


class _LoopClock:
    """Stands in for ``time`` inside Flower's SuperNode loop module: only ``sleep`` differs."""

    def __init__(self, pace: NodePace) -> None:
        self._pace = pace

    def sleep(self, seconds: float) -> None:
        caller = sys._getframe(1)  # which of the loop's three waits this is
        where = caller.f_code.co_name
        if where == "start_client_internal":
            node_id = caller.f_locals.get("node_id")
            self._pace.idle(seconds, node_id if isinstance(node_id, int) else None)
        elif where == "_push_messages":
            self._pace.awaiting_reply(seconds)
        elif where == "yield_object_contents":
            time.sleep(min(seconds, CONTENT_POLL_SECONDS))
        else:
            time.sleep(seconds)

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)


def pace_supernode(pace: NodePace, log: Callable[[str], None]) -> bool:
    """Make Flower's SuperNode loop in this process wait on ``pace``; False (and why, logged) if it keeps its own."""
    if os.environ.get(PACE_ENV) == "flower":
        log(f"{PACE_ENV}=flower: the SuperNode keeps Flower's own pace (3 s idle pulls)")
        return False
    import flwr
    from flwr.supernode import start_client_internal as loop

    problems = loop_contract(loop) + object_pull_contract()
    if problems:
        log(f"flwr {flwr.__version__}: the SuperNode loop is not the one fedgpu paces ({'; '.join(problems)}); "
            "it keeps Flower's own pace, up to 3 s per message each way")
        return False
    loop.time = _LoopClock(pace)  # type: ignore[attr-defined]
    _quicken_object_pulls()
    return True


# -- the ServerApp's side -----------------------------------------------------------------


class _GridClock:
    """Stands in for ``time`` in Flower's HTTP grid: pulls for replies start fast and slow down to 0.5 s."""

    def __init__(self) -> None:
        self._call: int | None = None
        self._wait = REPLY_PULL_SECONDS[0]

    def sleep(self, seconds: float) -> None:
        caller = sys._getframe(1)  # which of the loop's three waits this is
        if caller.f_code.co_name != "send_and_receive":
            time.sleep(seconds)
            return
        fastest, slowest = REPLY_PULL_SECONDS
        if id(caller) != self._call:  # a new send_and_receive: its replies may come at once
            self._call, self._wait = id(caller), fastest
        time.sleep(min(seconds, self._wait))
        self._wait = min(slowest, self._wait * 2)

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)


def pace_grid(log: Callable[[str], None], doorbells: str | None = None) -> bool:
    """Make Flower's HTTP grid in this (ServerApp) process pull replies quickly and ring the nodes it sends to.

    False (and why, logged) if the grid is not the one this module knows: it keeps Flower's pace.
    """
    import flwr
    from flwr.superlink.grid import http_grid

    problems = grid_contract(http_grid) + object_pull_contract()
    if problems:
        log(f"flwr {flwr.__version__}: the ServerApp grid is not the one fedgpu paces ({'; '.join(problems)}); "
            "it keeps Flower's own pace, up to 3 s per round")
        return False
    http_grid.time = _GridClock()  # type: ignore[attr-defined]
    _quicken_object_pulls()
    if doorbells:
        _ring_after_push(http_grid.HttpGrid, doorbells)
    return True


def _ring_after_push(grid_class: type, doorbells: str) -> None:
    """After ``push_messages`` returns (messages and objects stored), ring each destination node."""
    bells = Doorbells(doorbells)
    push_messages = grid_class.push_messages

    def push_and_ring(self, messages):  # Flower's signature
        messages = list(messages)
        ids = push_messages(self, messages)
        for node_id in {message.metadata.dst_node_id for message in messages}:
            bells.ring(node_id)
        return ids

    grid_class.push_messages = push_and_ring


class Doorbells:
    """Rings the doorbells in one directory: a datagram to the node's socket; nobody there, no matter."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sender.setblocking(False)

    def ring(self, node_id: int) -> bool:
        try:
            with unix_address(os.path.join(self.directory, str(node_id))) as address:
                self._sender.sendto(b"!", address)
            return True
        except OSError:  # a node of another host, gone, or its bell already full: it polls
            return False

