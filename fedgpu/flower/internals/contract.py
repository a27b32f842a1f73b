"""The contract with Flower: every Flower name this package uses, and the source checks its patches share.

``FLOWER_NAMES`` lists, in one place, every non-public Flower module and name
that ``fedgpu.flower.internals`` imports (a test checks the list against the
package's imports); :func:`missing_flower_names` imports them all, so a new
Flower release is checked against this one directory. The shape of the loops
paced here is checked by the per-module contracts (``pace``, ``round_hooks``,
``node_waits``, ``simulation``), which read Flower's source with
:func:`sleep_contract`.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from types import ModuleType

# (module, name): ``from module import name``; name None: ``import module`` (or the module itself, by path).
FLOWER_NAMES: tuple[tuple[str, str | None], ...] = (
    # pace
    ("flwr.supernode", "start_client_internal"),
    ("flwr.supernode.start_client_internal", None),
    ("flwr.superlink.grid", "http_grid"),
    ("flwr.supercore.inflatable", "inflatable_utils"),
    # processes and guard
    ("flwr.superlink.cli.flwr_serverapp", "flwr_serverapp"),
    ("flwr.superlink", "main"),
    ("flwr.superlink.cli.flower_superlink", None),
    ("flwr.supernode", "main"),
    ("flwr.supernode.cli.flower_supernode", "flower_supernode"),
    ("flwr.supernode.cli.flower_supernode", None),  # its module-level uvicorn: the node's Runtime API socket
    ("flwr.supercore.exit", "add_exit_handler"),
    # apps
    ("flwr.clientapp.client_app", "LoadClientAppError"),
    ("flwr.supercore.object_ref", "load_app"),
    ("flwr.cli.build", "build_fab_from_disk"),
    ("flwr.cli.install", "install_from_fab"),
    ("flwr.clientapp.utils", "get_load_client_app_fn"),
    # round_hooks
    ("flwr.server", "History"),
    ("flwr.server.workflow", "DefaultWorkflow"),
    ("flwr.server.workflow.constant", "MAIN_PARAMS_RECORD"),
    ("flwr.serverapp", "ServerApp"),
    ("flwr.serverapp.strategy", "Result"),
    ("flwr.serverapp.strategy", "Strategy"),
    # control
    ("flwr.proto.control_pb2", "ListNodesRequest"),
    ("flwr.proto.control_pb2", "ListRunsRequest"),
    ("flwr.proto.control_pb2", "StartRunRequest"),
    ("flwr.proto.control_pb2", "StreamLogsRequest"),
    ("flwr.cli.config_utils", "load_and_validate"),
    ("flwr.common.config", "parse_config_args"),
    ("flwr.common.serde", "fab_to_proto"),
    ("flwr.common.serde", "user_config_to_proto"),
    ("flwr.supercore.fab", "Fab"),
    ("flwr.supercore.constant", "NodeStatus"),
    ("flwr.cli.flower_config", "read_superlink_connection"),
    ("flwr.cli.utils", "init_http_client_from_connection"),
    # identity, codes and runtime_client
    ("flwr.supercore.task_identity", "TaskIdentity"),
    ("flwr.common.constant", "ErrorCode"),
    ("flwr.common.constant", "SubStatus"),
    ("flwr.proto.runtime_pb2", "AcquireTaskRequest"),
    ("flwr.supercore.constant", "TaskType"),
    ("flwr.supercore.heartbeat", "HeartbeatSender"),
    ("flwr.supercore.heartbeat", "make_task_heartbeat_fn_http"),
    ("flwr.supercore.interceptors", "RuntimeTokenHttpInterceptor"),
    ("flwr.supercore.interceptors", "RuntimeVersionHttpInterceptor"),
    ("flwr.supercore.retry", "make_simple_http_retry_invoker"),
    ("flwr.supercore.runtime", "RuntimeHttpClient"),
    ("flwr.supernode.runtime.run_clientapp", "pull_task_input"),
    ("flwr.supernode.runtime.run_clientapp", "push_message"),
    ("flwr.supernode.runtime.run_clientapp", "push_task_output"),
    # simulation
    ("flwr.server.superlink.fleet.vce.backend.backend", "Backend"),
    ("flwr.server.superlink.fleet.vce", "vce_api"),
    ("flwr.server.superlink.fleet.vce.backend", "backend"),
    ("flwr.server.superlink.linkstate", "InMemoryLinkState"),
    ("flwr.superlink.grid", "inmemory_grid"),
    ("flwr.simulation.run_simulation", None),
    ("flwr.server.superlink.fleet.vce.backend.raybackend", None),
    ("flwr.common.config", "get_metadata_from_config"),
    ("flwr.common.config", "get_project_config"),
    ("flwr.common.config", "get_fused_config_from_dir"),
    ("flwr.superlink.grid", "InMemoryGrid"),
    ("flwr.common.constant", "RUN_ID_NUM_BYTES"),
    ("flwr.common.constant", "SUPERLINK_NODE_ID"),
    ("flwr.common.constant", "TASK_ID_NUM_BYTES"),
    ("flwr.server.superlink.linkstate.utils", "generate_rand_int_from_bytes"),
    ("flwr.simulation.run_simulation", "_run_simulation"),
    ("flwr.supercore.constant", "NOOP_FEDERATION_ID"),
    ("flwr.supercore.run", "Run"),
    ("flwr.supercore.telemetry", "EventType"),
)


def missing_flower_names(names: tuple[tuple[str, str | None], ...] = FLOWER_NAMES) -> list[str]:
    """Every name of ``names`` the installed Flower lacks, as ``module:name`` and why; [] when all import."""
    missing = []
    for module_name, name in names:
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            missing.append(f"{module_name}: {err}")
            continue
        if name is not None and not hasattr(module, name):
            try:  # a submodule not yet imported by its package
                importlib.import_module(f"{module_name}.{name}")
            except ImportError:
                missing.append(f"{module_name}:{name}")
    return missing


def sleep_contract(
    module: ModuleType, expected: tuple[tuple[str, float], ...], time_uses: set[str] | None = None
) -> list[str]:
    """How ``module``'s use of ``time`` differs from ``expected``; [] when it is the one paced here.

    ``expected``: (enclosing function, seconds) of every ``time.sleep`` call, in
    source order; ``time_uses``: the other ``time.X`` it may use.
    """
    tree = ast.parse(inspect.getsource(module))
    sleeps: list[tuple[str, object]] = []
    other_uses: set[str] = set()

    def visit(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            if isinstance(child, ast.Attribute) and isinstance(child.value, ast.Name) and child.value.id == "time":
                if child.attr == "sleep" and isinstance(node, ast.Call) and node.func is child:
                    arg = node.args[0] if node.args else None
                    value = arg.value if isinstance(arg, ast.Constant) else ast.unparse(arg) if arg else None
                    sleeps.append((function, value))
                elif child.attr not in (time_uses or set()):
                    other_uses.add(f"time.{child.attr}")
            visit(child, inner)

    visit(tree, "<module>")
    problems = []
    if tuple(sleeps) != expected:
        problems.append(f"its time.sleep calls are {sleeps}, expected {list(expected)}")
    if other_uses:
        problems.append(f"it uses {sorted(other_uses)} besides those")
    return problems
