"""``fedgpu server``'s options, checked into a :class:`ServerPlan` before anything starts.

Every problem is one ``BadInput`` line (exit 2). A plan says where the
SuperLink listens and how it is secured, which run is submitted (one of
fedgpu's tasks, or a user's Flower app), and, for ``--simulation-nodes``,
the simulation host's settings.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fedgpu.errors import BadInput
from fedgpu.flower.config import parse_task_options
from fedgpu.flower.settings import RunSettings


@dataclass(frozen=True)
class TlsFiles:
    """The SuperLink's TLS: the CA that signed its certificate, the certificate, its key."""

    ca_cert: str
    cert: str
    key: str


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 9092
    ready_timeout: float = 60.0
    tls: TlsFiles | None = None  # None: insecure (loopback and trusted networks only)
    auth_public_keys: tuple[str, ...] = ()  # SuperNode public keys: only these nodes may join (needs TLS)

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"


@dataclass(frozen=True)
class SimulationSettings:
    """``--simulation``: virtual nodes in one simulation host, each message in a child (fedgpu.flower.simulation)."""

    nodes: int
    workers: int
    isolation: str = "zygote"
    timeout: float | None = None  # a message's child at most (--timeout)
    node_config: str = ""  # more node config for every virtual node


@dataclass(frozen=True)
class ServerPlan:
    """A checked ``fedgpu server``: what to submit, where, how."""

    run_dir: Path
    server: ServerSettings
    run: RunSettings | None = None  # one of fedgpu's tasks, with our ServerApp
    app_dir: Path | None = None  # else the user's Flower app
    app: dict[str, Any] = field(default_factory=dict)  # its name, version, components
    run_config: tuple[str, ...] = ()  # --run-config overrides for the user's app
    wait_nodes: int = 0  # submit the run once this many client nodes are registered (0: at once)
    start_timeout: float = 300.0  # seconds to wait for them (and, in a user's ServerApp, for more)
    run_timeout: float | None = None  # seconds the submitted run may take; None: no limit
    simulation: SimulationSettings | None = None  # virtual nodes in a simulation host instead of a SuperLink


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


def check_task_run(
    options: dict[str, Any], *, min_clients: int, sampled: int, run_dir: Path | None = None
) -> RunSettings:
    """The run settings of one of fedgpu's tasks from the shared options; BadInput if they cannot work."""
    from fedgpu.tasks import UnknownTaskError, data_problem, resolve_task

    task = str(options["task"])
    try:
        resolve_task(task)
        task_options = json.dumps(parse_task_options(options["task_options"]))
    except (UnknownTaskError, ValueError) as err:
        raise BadInput(str(err)) from None
    run = RunSettings(
        task=task, num_rounds=int(options["rounds"]), min_clients=int(options["min_clients"] or min_clients),
        sampled=int(options["sampled"] or sampled), eval_sampled=int(options["eval_sampled"]),
        lr=float(options["lr"] or 0.0), lr_decay=float(options["lr_decay"]),
        local_epochs=int(options["local_epochs"] or 0), batch_size=int(options["batch_size"]),
        partitioner=str(options["partitioner"]), alpha=float(options["alpha"]), seed=int(options["seed"]),
        data_files=str(options["data_files"]), task_options_json=task_options,
        isolation=str(options.get("isolation") or "zygote"), device=str(options["device"]),
        threads=int(options["threads"]),
        message_timeout=float(options["message_timeout"]), start_timeout=float(options["start_timeout"]),
        run_dir=str(run_dir or ""),
    )
    problem = data_problem(task, run.task_options())
    if problem:
        raise BadInput(problem)
    return run


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
