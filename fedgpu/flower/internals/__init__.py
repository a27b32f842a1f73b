"""The Flower boundary: everything of fedgpu that reaches past Flower's public API (flwr 1.42).

Every import of a non-public Flower module, every private attribute, every
patch of Flower's pace or classes, every in-process run of a Flower CLI and
every line of Flower's output read as text lives in this package; the rest of
fedgpu imports only ``flwr.app``, ``flwr.clientapp``, ``flwr.serverapp`` and
``flwr.common``'s public names (``tests/test_flower_boundary.py`` holds it to
that). By what they do:

* ``pace``: the SuperNode loop's and the ServerApp grid's waits, and the doorbells;
* ``processes``: Flower's SuperLink, ``flwr-serverapp`` and SuperNode CLIs run in-process;
* ``guard``: who may reach the SuperLink and SuperNodes (owner-only apps, a port bound first);
* ``round_hooks`` and ``node_waits``: a user's ServerApp recorded round by round, and its
  endless wait for nodes ended;
* ``runtime_client``, ``apps``, ``identity``, ``codes``: the node's Runtime API client, loading
  and packaging apps, the task identity a child adopts, Flower's error codes;
* ``control``: the SuperLink's Control API, as Flower's CLI asks it;
* ``simulation``: Flower's Simulation Runtime with fedgpu's backend and dispatcher;
* ``marks``: Flower's output lines read as text;
* ``contract``: every Flower name used here, in one list, and the source checks.

The names re-exported below are the ones fedgpu's other modules use; each
submodule imports Flower only where it needs it (this package stays light to import).
"""

from fedgpu.flower.internals.contract import sleep_contract
from fedgpu.flower.internals.control import Control
from fedgpu.flower.internals.guard import FLEET_PATHS, bind_listener, guard_app_factory, guard_supernode_runtime
from fedgpu.flower.internals.node_waits import (
    NODES_POLL_GAP_SECONDS,
    NodeWaitWatch,
    WaitingForNodes,
    node_wait_contract,
    watch_node_waits,
)
from fedgpu.flower.internals.pace import (
    Doorbells,
    NodePace,
    grid_contract,
    loop_contract,
    object_pull_contract,
    pace_grid,
    pace_supernode,
)
from fedgpu.flower.internals.processes import EXIT_PORT_TAKEN, serverapp_main, superlink_main
from fedgpu.flower.internals.round_hooks import app_rounds_contract, record_app_rounds

__all__ = [
    "EXIT_PORT_TAKEN", "FLEET_PATHS", "NODES_POLL_GAP_SECONDS",
    "Control", "Doorbells", "NodePace", "NodeWaitWatch", "WaitingForNodes",
    "app_rounds_contract", "bind_listener", "grid_contract", "guard_app_factory", "guard_supernode_runtime",
    "loop_contract", "node_wait_contract", "object_pull_contract", "pace_grid", "pace_supernode",
    "record_app_rounds", "serverapp_main", "sleep_contract", "superlink_main", "watch_node_waits",
]
