"""Flower's Simulation Runtime with a backend of fedgpu's and a dispatcher that is told (flwr 1.42).

Flower's ``flwr-simulation`` runs a ServerApp thread on an ``InMemoryGrid`` and
``vce.start_vce``, which registers the virtual nodes, keeps one Context per
node and runs ``run_api``: worker threads hand each message to a ``Backend``'s
``process_message(message, context)``. Three things of it are changed here,
in the simulation host process only:

* the backend: ``start_vce`` builds ``RayBackend(backend_config)`` whatever
  backend is named, importing the name when it runs; the module attribute
  is swapped for the factory given (:func:`run_simulation_runtime`);
* the dispatcher: ``add_messages_to_queue`` asks the LinkState for every
  node's messages every 0.1 s (10 000 queries a second with 1000 nodes, on
  the cores the children train on). Its replacement is told by the LinkState
  which nodes a message was stored for, and hands each node one message at a
  time (its next once its reply is stored, so a node's Context is never
  computed twice at once);
* the pace: the grid's ``send_and_receive`` sleeps 0.1 s between pulls for
  replies; its sleep here ends as soon as a reply is stored.

Flower keeps the rest: node registration, the Context store, run config,
``node_config`` (partition-id, num-partitions), the grid and the ServerApp
thread. :func:`simulation_contract` names any change of shape, and the run
refuses to start on a Flower it does not fit.
"""

from __future__ import annotations

import inspect
import sys
import threading
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.server.superlink.fleet.vce.backend.backend import Backend  # noqa: F401 - re-exported: fedgpu's backend base

from fedgpu.flower.internals.contract import sleep_contract

RAY_BACKEND_MODULE = "flwr.server.superlink.fleet.vce.backend.raybackend"
DISPATCH_WAIT_SECONDS = 0.5  # the dispatcher's longest wait, so that it sees the run stop


def simulation_contract() -> list[str]:
    """What differs in Flower's Simulation Runtime from what :func:`run_simulation_runtime` changes."""
    import importlib

    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.fleet.vce.backend import backend as backend_module
    from flwr.server.superlink.linkstate import InMemoryLinkState
    from flwr.superlink.grid import inmemory_grid

    # The module: flwr.simulation exports a function of the same name.
    run_simulation_module = importlib.import_module("flwr.simulation.run_simulation")
    problems = []
    start_vce = inspect.getsource(vce_api.start_vce)
    if "from .backend.raybackend import RayBackend" not in start_vce or "RayBackend(backend_config)" not in start_vce:
        problems.append("start_vce no longer builds RayBackend(backend_config) from .backend.raybackend")
    if "target=add_messages_to_queue" not in inspect.getsource(vce_api.run_api):
        problems.append("run_api no longer starts add_messages_to_queue as its dispatcher")
    if (list(inspect.signature(vce_api.add_messages_to_queue).parameters)
            != ["state", "queue", "nodes_mapping", "f_stop"]):
        problems.append("add_messages_to_queue no longer takes (state, queue, nodes_mapping, f_stop)")
    abstract = set(getattr(backend_module.Backend, "__abstractmethods__", ()))
    if abstract != {"build", "is_worker_idle", "terminate", "process_message"}:
        problems.append(f"Backend's abstract methods are {sorted(abstract)}")
    for name, wanted in (("store_message_ins", ["self", "message"]), ("store_message_res", ["self", "message"])):
        method = getattr(InMemoryLinkState, name, None)
        if method is None or list(inspect.signature(method).parameters) != wanted:
            problems.append(f"InMemoryLinkState.{name}({', '.join(wanted[1:])}) is gone or takes other arguments")
    get_ins = list(inspect.signature(InMemoryLinkState.get_message_ins).parameters)
    if get_ins[:3] != ["self", "node_id", "limit"]:
        problems.append("InMemoryLinkState.get_message_ins(node_id, limit) is gone or takes other arguments")
    problems += [f"inmemory_grid: {p}"
                 for p in sleep_contract(inmemory_grid, (("send_and_receive", "self.pull_interval"),), {"time"})]
    wanted = {"num_supernodes", "exit_event", "client_app", "server_app_attr", "backend_config", "app_dir", "run",
              "server_app_context", "is_app"}
    missing = wanted - set(inspect.signature(run_simulation_module._run_simulation).parameters)
    if missing:
        problems.append(f"_run_simulation no longer takes {sorted(missing)}")
    return problems


class StoredMessages:
    """Which nodes have a message waiting, as the LinkState stores them; one message per node at a time.

    ``stored(node)`` on every message stored for a node, ``replied(node)`` on
    every reply stored from one; ``take()`` waits for nodes that have a message
    and no message in flight, and marks them busy.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._waiting: set[int] = set()
        self._busy: set[int] = set()

    def stored(self, node_id: int) -> None:
        with self._changed:
            self._waiting.add(node_id)
            self._changed.notify_all()

    def replied(self, node_id: int) -> None:
        with self._changed:
            self._busy.discard(node_id)
            self._waiting.add(node_id)  # its next message, if it has one
            self._changed.notify_all()

    def take(self, timeout: float) -> list[int]:
        with self._changed:
            ready = self._waiting - self._busy
            if not ready:
                self._changed.wait(timeout)
                ready = self._waiting - self._busy
            self._waiting -= ready
            return sorted(ready)

    def dispatched(self, node_id: int) -> None:
        with self._changed:
            self._busy.add(node_id)


class _ReplyClock:
    """The grid module's ``time``: its sleep between pulls for replies ends when a reply is stored."""

    def __init__(self) -> None:
        self.reply_stored = threading.Event()

    @staticmethod
    def time() -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        self.reply_stored.wait(seconds)
        self.reply_stored.clear()


def _told_dispatcher(stored: StoredMessages) -> Callable[..., None]:
    def add_messages_to_queue(state: Any, queue: Any, nodes_mapping: dict[int, int], f_stop: threading.Event) -> None:
        """Flower's dispatcher, told which nodes have messages instead of asking every node every 0.1 s."""
        while not f_stop.is_set():
            for node_id in stored.take(DISPATCH_WAIT_SECONDS):
                if node_id not in nodes_mapping:
                    continue
                messages = state.get_message_ins(node_id=node_id, limit=1)
                if messages:  # its next one, if any, is asked for once this one's reply is stored (replied)
                    stored.dispatched(node_id)
                    queue.put(messages[0])

    return add_messages_to_queue


def _tell_on_store(linkstate_class: type, stored: StoredMessages, clock: _ReplyClock) -> None:
    store_ins, store_res = linkstate_class.store_message_ins, linkstate_class.store_message_res

    def store_message_ins(self, message):  # Flower's signature
        message_id = store_ins(self, message)
        if message_id:
            stored.stored(message.metadata.dst_node_id)
        return message_id

    def store_message_res(self, message):
        try:
            return store_res(self, message)
        finally:  # stored or refused, the node's message is done with
            stored.replied(message.metadata.src_node_id)
            clock.reply_stored.set()

    linkstate_class.store_message_ins = store_message_ins
    linkstate_class.store_message_res = store_message_res


def app_components(app_dir: str | Path) -> tuple[str, str, str, str]:
    """(ServerApp reference, ClientApp reference, FAB id, FAB version) from an app's pyproject.toml."""
    from flwr.common.config import get_metadata_from_config, get_project_config

    config = get_project_config(str(app_dir))
    components = config["tool"]["flwr"]["app"]["components"]
    fab_id, fab_version = get_metadata_from_config(config)
    return str(components["serverapp"]), str(components["clientapp"]), fab_id, fab_version


def in_memory_grid_class() -> type:
    """The Grid a simulation's ServerApp gets (Flower's ``InMemoryGrid``), for the hooks that watch it."""
    from flwr.superlink.grid import InMemoryGrid

    return InMemoryGrid


def run_simulation_runtime(
    app_dir: str,
    num_supernodes: int,
    backend_factory: Callable[[dict], Any],
    *,
    run_config: dict[str, Any] | None = None,
) -> None:
    """Run the app in ``app_dir`` on ``num_supernodes`` virtual nodes; return when its ServerApp does.

    ``backend_factory(backend_config)`` makes the Backend that runs every
    message. ``run_config`` overrides the app's, as ``--run-config`` does. The
    ServerApp's exception is raised here; the ClientApp is never loaded in
    this process.
    """
    from flwr.app import Context, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.common.config import get_fused_config_from_dir
    from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.linkstate import InMemoryLinkState
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
    from flwr.simulation.run_simulation import _run_simulation  # the module's, whatever flwr.simulation exports
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType
    from flwr.superlink.grid import inmemory_grid

    problems = simulation_contract()
    if problems:
        import flwr

        raise RuntimeError(f"flwr {flwr.__version__}'s Simulation Runtime is not the one fedgpu runs: "
                           f"{'; '.join(problems)}")
    server_app_ref, _, fab_id, fab_version = app_components(app_dir)
    stored, clock = StoredMessages(), _ReplyClock()
    # start_vce imports `.backend.raybackend.RayBackend` when it runs: the module it finds is one whose
    # RayBackend is ours. Flower's own would import Ray, which this process never needs.
    stand_in = types.ModuleType(RAY_BACKEND_MODULE, "fedgpu's backend in place of Flower's Ray backend")
    stand_in.RayBackend = backend_factory  # type: ignore[attr-defined]
    sys.modules[RAY_BACKEND_MODULE] = stand_in
    vce_api.add_messages_to_queue = _told_dispatcher(stored)
    _tell_on_store(InMemoryLinkState, stored, clock)
    inmemory_grid.time = clock  # type: ignore[assignment]

    run_id = generate_rand_int_from_bytes(RUN_ID_NUM_BYTES)
    run = Run.create_empty(run_id=run_id)
    run.fab_id, run.fab_version, run.override_config = fab_id, fab_version, dict(run_config or {})
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    TaskIdentity.task_id = run.primary_task_id
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    context = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(),
                      run_config=get_fused_config_from_dir(Path(app_dir), run.override_config))
    _run_simulation(
        num_supernodes=num_supernodes,
        exit_event=EventType.FLWR_SIMULATION_RUN_LEAVE,
        client_app=ClientApp(),  # never called: every message's child loads the app's own ClientApp
        server_app_attr=server_app_ref,
        backend_name="fedgpu",
        backend_config={},
        app_dir=str(app_dir),
        run=run,
        server_app_context=context,
        is_app=True,
    )
