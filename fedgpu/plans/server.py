"""``fedgpu server``: every option checked into a :class:`~fedgpu.flower.server_plan.ServerPlan`.

Every problem is one ``BadInput`` line (exit 2) before anything starts: TLS
and node keys, GPU placement, the port, the app or the task, the
simulation's options, the run directory.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from fedgpu.errors import BadInput
from fedgpu.flower.server_plan import ServerPlan, ServerSettings, SimulationSettings, TlsFiles
from fedgpu.plans.task import check_task_run


def plan_server(options: dict[str, Any]) -> ServerPlan:
    """Check every option of ``fedgpu server`` before anything starts; BadInput names the first problem.

    Side effects only where the server needs them: the parent-death watch, and
    the placement settings exported for the ServerApp's evaluation children.
    """
    from fedgpu.isolation.procs import watch_parent
    from fedgpu.net import port_free
    from fedgpu.nvml.placement import check_placement

    watch_parent(options["parent_pid"])
    tls, auth_keys = _server_security(options)
    placement = check_placement(options, children=True)
    os.environ.update(placement.to_env())  # for the ServerApp's evaluation children
    host, port = str(options["host"]), int(options["port"])
    simulation = _simulation_settings(options)
    if simulation is None and not port_free(port, host):
        raise BadInput(f"port {port} on {host} is in use")
    run_dir = Path(options["run_dir"] or Path("runs") / time.strftime("%Y%m%d-%H%M%S")).absolute()
    server = ServerSettings(host=host, port=port, tls=tls, auth_public_keys=auth_keys)
    if options.get("app_dir"):
        from fedgpu.flower.app import check_app, describe
        from fedgpu.names import APP_CHECKED_ENV

        # The launcher checked the app already (it imports torch in a child: seconds saved).
        checked = os.environ.get(APP_CHECKED_ENV) == str(Path(str(options["app_dir"])).resolve())
        app, overrides = check_app(str(options["app_dir"]), tuple(options["run_config"]), import_check=not checked)
        plan = ServerPlan(run_dir, server, app_dir=app.directory, run_config=overrides, app=describe(app))
    else:
        if options.get("run_config"):
            raise BadInput("--run-config is for a Flower app (--app DIR); fedgpu's tasks take their own options")
        plan = ServerPlan(run_dir, server, run=check_task_run(options, min_clients=2, sampled=2, run_dir=run_dir))
    run_timeout = options.get("run_timeout")
    plan = replace(plan, wait_nodes=int(options.get("wait_nodes") or 0), start_timeout=float(options["start_timeout"]),
                   run_timeout=None if run_timeout is None else float(run_timeout), simulation=simulation)
    if not options["check"]:
        from fedgpu.names import RUN_DIR_ENV
        from fedgpu.run_dir import prepare_run_dir

        # Under `fedgpu run` the launcher prepared the directory and its logs are there already.
        prepare_run_dir(run_dir, umask=options["umask"], force=bool(options.get("force")),
                        ours=os.environ.get(RUN_DIR_ENV) == str(run_dir))
    return plan


def _simulation_settings(options: dict[str, Any]) -> SimulationSettings | None:
    """``--simulation-nodes N`` and what only a simulation takes; None for a run on a SuperLink."""
    nodes = int(options.get("simulation_nodes") or 0)
    only = [name for name in ("workers", "node_config", "timeout") if options.get(name)]
    if not nodes:
        if only:
            raise BadInput(f"--{only[0].replace('_', '-')} is for a simulation (--simulation-nodes N)")
        return None
    if options.get("isolation") == "none":
        raise BadInput("--isolation none: a simulation runs every message in a child (zygote or spawn)")
    for name in ("ssl_ca_certfile", "auth_public_keys", "wait_nodes"):
        if options.get(name):
            raise BadInput(f"--{name.replace('_', '-')} is for a SuperLink; a simulation has none")
    from fedgpu.flower.config import check_node_config

    node_config = str(options.get("node_config") or "")
    check_node_config(node_config)
    return SimulationSettings(nodes=nodes, workers=int(options.get("workers") or usable_cores()),
                              isolation=str(options.get("isolation") or "zygote"),
                              timeout=None if options.get("timeout") is None else float(options["timeout"]),
                              node_config=node_config)


def usable_cores() -> int:
    """The cores this process may use; a simulation's default workers, one message each."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _server_security(options: dict[str, Any]) -> tuple[TlsFiles | None, tuple[str, ...]]:
    files = [options[name] for name in ("ssl_ca_certfile", "ssl_certfile", "ssl_keyfile")]
    keys_path = options["auth_public_keys"]
    if any(files) and not all(files):
        raise BadInput("TLS needs all three of --ssl-ca-certfile, --ssl-certfile and --ssl-keyfile")
    tls = TlsFiles(*(str(Path(f).absolute()) for f in files)) if all(files) else None
    keys: tuple[str, ...] = ()
    if keys_path:
        if tls is None:
            raise BadInput("--auth-public-keys needs TLS (--ssl-ca-certfile, --ssl-certfile, --ssl-keyfile)")
        path = Path(str(keys_path)).absolute()
        keys = tuple(str(key) for key in sorted(path.glob("*.pub"))) if path.is_dir() else (str(path),)
        if not keys:
            raise BadInput(f"--auth-public-keys {keys_path}: no *.pub file there")
    return tls, keys
