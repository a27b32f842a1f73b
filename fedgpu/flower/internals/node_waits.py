"""A user's ServerApp that waits for more client nodes than there are: ended, with one line (flwr 1.42)."""

from __future__ import annotations

import inspect
import os
import sys
import time
from collections.abc import Callable

from fedgpu.names import NODES_WAIT_ENV, TOO_FEW_NODES_MARK

NODES_POLL_GAP_SECONDS = 10.0  # get_node_ids calls further apart than this are not one waiting loop


class WaitingForNodes(RuntimeError):
    """A ServerApp polled for client nodes, sending nothing, for longer than it may wait."""


class NodeWaitWatch:
    """Tells a ServerApp that waits for nodes that never come from one at work.

    Flower's strategies wait for ``min_available_nodes`` by polling
    ``grid.get_node_ids()`` every second, for ever (``sample_nodes`` in
    ``flwr.serverapp.strategy.strategy_utils``). A waiting loop, here, is a run
    of polls each within ``NODES_POLL_GAP_SECONDS`` of the last that see the
    same number of nodes, with no message sent in between; one that lasts
    ``limit`` seconds raises :class:`WaitingForNodes`. A new node, or a message
    sent, starts the count again.
    """

    def __init__(self, limit: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self._clock = clock
        self._since: float | None = None  # when the current waiting loop began
        self._last = 0.0
        self._count = -1

    def sent(self) -> None:
        self._since = None

    def polled(self, count: int) -> None:
        now = self._clock()
        if self._since is None or now - self._last > NODES_POLL_GAP_SECONDS or count != self._count:
            self._since = now
        self._last, self._count = now, count
        if now - self._since >= self.limit:
            raise WaitingForNodes(
                f"the app's strategy waits for more client nodes than the {count} connected, and none came within "
                f"{self.limit:g} s (--start-timeout): give --nodes N, or lower its minimum")


def node_wait_contract(grid_class: type) -> list[str]:
    """What differs in Flower's ServerApp grid from the one :func:`watch_node_waits` watches."""
    problems = []
    for name, parameters in (("get_node_ids", ["self"]), ("push_messages", ["self", "messages"])):
        method = getattr(grid_class, name, None)
        if method is None or list(inspect.signature(method).parameters) != parameters:
            problems.append(f"{grid_class.__name__}.{name}({', '.join(parameters)}) is gone or takes other arguments")
    return problems


def watch_node_waits(log: Callable[[str], None], grid_class: type | None = None) -> bool:
    """In a user's ServerApp process: a strategy that waits longer than $FEDGPU_NODES_WAIT_SECONDS for nodes fails.

    The one line it prints (``TOO_FEW_NODES_MARK``) reaches the server through
    Flower's log stream, and the server ends the run with exit 3. False (and
    why, logged) where nothing is watched: no limit set, or another grid.
    """
    limit = os.environ.get(NODES_WAIT_ENV)
    if not limit:
        return False
    if grid_class is None:
        from flwr.superlink.grid import http_grid

        grid_class = http_grid.HttpGrid
    problems = node_wait_contract(grid_class)
    if problems:
        log(f"the ServerApp grid is not the one fedgpu watches ({'; '.join(problems)}): a strategy waiting for more "
            "nodes than there are waits for ever")
        return False
    watch = NodeWaitWatch(float(limit))
    get_node_ids, push_messages = grid_class.get_node_ids, grid_class.push_messages

    def watched_get_node_ids(self):  # Flower's signature
        node_ids = list(get_node_ids(self))
        try:
            watch.polled(len(node_ids))
        except WaitingForNodes as err:
            # Printed after Flower mirrors this process's output to the run's log stream.
            print(f"{TOO_FEW_NODES_MARK}{err}", file=sys.stderr, flush=True)
            raise
        return node_ids

    def watched_push_messages(self, messages):
        watch.sent()
        return push_messages(self, messages)

    grid_class.get_node_ids = watched_get_node_ids
    grid_class.push_messages = watched_push_messages
    return True

