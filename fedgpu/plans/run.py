"""``fedgpu run`` (and ``./run.sh``, which becomes it): every option checked into a :class:`LaunchPlan`.

Nothing is started and no directory is made before the whole plan holds: the
shape (CLIENTS MIN SAMPLED ROUNDS), the task or the app, the role and its
options, the simulation's options, the node config, the GPUs, the port, this
host's memory for the client nodes, and the run directory. ``fedgpu.launch``
carries the plan out.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedgpu.names import APP_CHECKED_ENV, RUN_DIR_ENV
from fedgpu.shape import DEFAULT_NODES, read_positional


@dataclass
class LaunchPlan:
    """What to start, already checked: every argument list is valid for its command."""

    nodes: int
    run_dir: Path
    port: int
    server_args: list[str]  # `fedgpu server` options, without --run-dir, --port, --parent-pid
    node_args: list[str]  # each `fedgpu client` options, without --partition-id, --num-partitions, --superlink
    zygote_args: list[str] = field(default_factory=list)  # `fedgpu zygote` warm-up options; [] for no zygote
    what: str = ""  # the task or app, as the console names it
    needed_alive: int = 1  # fewer live nodes than this and the run cannot finish
    needed_as: str = "the run needs"  # what those are, for the message
    start_timeout: float | None = None  # every node registered by then, or exit 3 (a task's ServerApp waits itself)
    tls: bool = False
    prog: str = "fedgpu"  # how messages name us: "run.sh" when run.sh called
    simulated: bool = False  # --simulation: the server hosts `nodes` virtual nodes; no client process, no SuperLink
    workers: int = 0  # --simulation: messages in flight at once
    role: str = "all"  # all: everything here; server: the SuperLink and the run; nodes: the zygote and client nodes
    host: str = "127.0.0.1"  # where the SuperLink listens
    superlink: str = ""  # --role nodes: the SuperLink its client nodes connect to
    partitions: list[int] | None = None  # --role nodes: the partition ids of the client nodes started here
    log_dir: Path | None = None  # --role nodes: where the zygote and the client nodes log [default: run_dir]
    certs: Path | None = None  # --role server or nodes: certificates made beforehand (--certs)
    port_picked: bool = False  # role all, no --port: the launcher picked it and may pick another if taken

    @property
    def logs(self) -> Path:
        return self.log_dir or self.run_dir

    def node_ids(self) -> list[int]:
        """The partition ids of the client nodes this launcher starts."""
        if self.role == "server" or self.simulated:
            return []
        return list(range(self.nodes)) if self.partitions is None else list(self.partitions)

    def describe(self) -> str:
        if self.role == "server":
            return (f"server for {self.what} ({self.nodes} client nodes) on {self.host}:{self.port}; "
                    f"run directory {self.run_dir}")
        if self.role == "nodes":
            ids = ",".join(map(str, self.node_ids()))
            return (f"{len(self.node_ids())} client nodes (partitions {ids} of {self.nodes}) for {self.what} "
                    f"on SuperLink {self.superlink}; logs in {self.logs}")
        if self.simulated:
            return (f"simulation of {self.nodes} virtual clients for {self.what}, {self.workers} messages at once; "
                    f"run directory {self.run_dir}")
        return f"{self.nodes} client nodes for {self.what}; run directory {self.run_dir}"


def plan_run(
    options: dict[str, Any],
    *,
    prog: str,
    given: set[str],
    server_argv: Callable[[dict[str, Any]], list[str]],
    node_argv: Callable[[dict[str, Any]], list[str]],
    warn: Callable[[str], None],
) -> LaunchPlan:
    """Check every option of ``fedgpu run`` before anything starts; BadInput names the first problem.

    ``given``: the options the user gave (not defaults). ``server_argv`` and
    ``node_argv`` turn option values into ``fedgpu server`` / ``fedgpu client``
    arguments: one definition of each option, in the CLI.
    """
    from fedgpu.capacity import too_many
    from fedgpu.errors import BadInput
    from fedgpu.flower.config import check_node_config
    from fedgpu.net import free_port, port_free
    from fedgpu.nvml.placement import check_placement
    from fedgpu.plans.task import check_task_run
    from fedgpu.run_dir import prepare_run_dir

    values = dict(options)
    read_positional(values, given, numbers_only=prog != "fedgpu")
    mp, app_dir, simulated = bool(values["mp"]), values.get("app_dir"), bool(values.get("simulation"))
    role = str(values.get("role") or "all")
    _check_role_options(values, given, role)
    _check_simulation_options(values, given, simulated)
    task_only = {"rounds", "min_clients", "sampled", "eval_sampled", "task", "lr", "lr_decay", "local_epochs",
                 "batch_size",
                 "partitioner", "alpha", "seed", "data_files", "task_options", "device", "threads", "message_timeout"}
    if app_dir:
        from fedgpu.flower.app import check_app

        mixed = sorted(task_only & given)
        if mixed:
            raise BadInput(f"--{mixed[0].replace('_', '-')} is for fedgpu's own tasks; a Flower app takes --run-config")
        app, overrides = check_app(str(app_dir), tuple(values["run_config"]), warn=warn)
        # The app's federation: its pyproject's [tool.flwr.federations], else the default connection of $FLWR_HOME.
        nodes = int(values["nodes"] or app.num_supernodes or DEFAULT_NODES)
        needed, sampled, what = 1, nodes, app.name
        server_values = {"app_dir": str(app.directory), "run_config": overrides}
        zygote_args = ["--app", str(app.directory)]
        os.environ[APP_CHECKED_ENV] = str(app.directory)
    else:
        if values["run_config"]:
            raise BadInput("--run-config is for a Flower app (give APP_DIR); fedgpu's tasks take their own options")
        nodes = int(values["nodes"] or DEFAULT_NODES)
        values["min_clients"] = values["min_clients"] or nodes
        values["sampled"] = values["sampled"] or min(5, nodes)
        if values["data_files"]:  # the server and the nodes run elsewhere (in the run directory)
            values["data_files"] = str(Path(values["data_files"]).absolute())
        run = check_task_run(values, min_clients=nodes, sampled=values["sampled"])
        needed, sampled, what = int(values["sampled"]), int(values["sampled"]), f"task {values['task']}"
        server_values = {name: values[name] for name in task_only | {"start_timeout"}}
        # The zygote loads the run's task data once (its splits, its partitioner), for every child.
        run_data = {"task": run.task, "options": run.task_options(), "partitions": nodes}
        zygote_args = ["--task", str(values["task"]), "--run-data", json.dumps(run_data)]
    if app_dir and not simulated:  # the server submits the run once every node is registered (a task's ServerApp waits)
        server_values.update(wait_nodes=nodes, start_timeout=values["start_timeout"])
    elif app_dir:  # how long the app's strategy may wait for more nodes than there are
        server_values.update(start_timeout=values["start_timeout"])
    workers = 0
    if simulated:
        workers = int(values["workers"] or simulation_workers(app.federation if app_dir else None))
        server_values.update(simulation_nodes=nodes, workers=workers, node_config=values["node_config"],
                             timeout=values["timeout"])
        needed = 0
    server_values["run_timeout"] = values["run_timeout"]
    if values.get("host"):
        server_values["host"] = values["host"]
    check_node_config(str(values["node_config"]))
    check_placement(values, children=mp)
    partitions = _read_partitions(values.get("partitions"), nodes) if role == "nodes" else None
    certs = _check_certs(values.get("certs"), role, partitions or [])
    port = values["port"]
    if simulated or role == "nodes":
        port = 0  # no SuperLink here
    elif port is None:
        port = free_port()
    elif not port_free(int(port)):
        raise BadInput(f"port {port} on 127.0.0.1 is in use")
    if not values["force"] and not simulated and role != "server":  # a virtual client costs its Context only
        if partitions is None:
            problem = too_many(nodes, sampled, mp=mp)
        else:  # this host's share
            problem = too_many(len(partitions), min(sampled, len(partitions)), mp=mp)
        if problem:
            raise BadInput(problem)
    run_dir = Path(values["run_dir"] or Path("runs") / time.strftime("%Y%m%d-%H%M%S")).absolute()
    if not values["run_dir"] and run_dir.exists():
        run_dir = run_dir.with_name(f"{run_dir.name}-{os.getpid()}")
    # --role nodes leaves the run directory to the server (another host's, often the same shared one): its
    # processes carry it, its logs go to --log-dir.
    log_dir = Path(values["log_dir"]).absolute() if values.get("log_dir") else None
    if not values["check"]:
        # A Slurm job makes its certificates in the run directory before its server's step starts, and marks the
        # steps' processes with that directory: the directory is this run's, as `fedgpu server` reads it.
        ours = role == "server" and os.environ.get(RUN_DIR_ENV) == str(run_dir)
        prepare_run_dir((log_dir or run_dir) if role == "nodes" else run_dir, umask=values["umask"],
                        force=bool(values["force"]), ours=ours)
    placement = {name: values[name] for name in ("gpus", "placement", "gpu_mem", "admission_timeout")}
    node_values = {**placement, "mp": mp, "isolation": values["isolation"], "node_config": values["node_config"],
                   "timeout": values["timeout"], "task": None if app_dir else values["task"]}
    return LaunchPlan(
        nodes=nodes,
        run_dir=run_dir,
        port=int(port),
        port_picked=values["port"] is None and not simulated and role == "all",
        server_args=server_argv({**server_values, **placement, "isolation": values["isolation"],
                                 "umask": f"{values['umask']:03o}"}),
        node_args=node_argv(node_values),
        zygote_args=zygote_args if mp and values["isolation"] == "zygote" else [],
        what=what,
        needed_alive=needed if role == "all" else 0,
        needed_as="the run needs" if app_dir else "sampled per round",
        start_timeout=float(values["start_timeout"]) if app_dir and not simulated and role == "all" else None,
        tls=bool(values["tls"]),
        prog=prog,
        simulated=simulated,
        workers=workers,
        role=role,
        host=str(values.get("host") or "127.0.0.1"),
        superlink=str(values.get("superlink") or ""),
        partitions=partitions,
        log_dir=log_dir,
        certs=certs,
    )


ROLE_OPTIONS = ("superlink", "partitions", "log_dir")  # what only --role nodes takes


def _check_role_options(values: dict[str, Any], given: set[str], role: str) -> None:
    """Options that a role takes, or cannot take; BadInput names the first."""
    from fedgpu.errors import BadInput
    from fedgpu.net import is_host_port

    def option(name: str) -> str:
        return "--" + name.replace("_", "-")

    if role != "nodes":
        for name in ROLE_OPTIONS:
            if name in given:
                started = " (--role server starts the SuperLink)" if role == "server" and name == "superlink" else ""
                raise BadInput(f"{option(name)} is for --role nodes{started}")
    if role == "all":
        if "certs" in given:
            raise BadInput("--certs is for --role server or nodes; --tls makes the run's own certificates")
        return
    if values.get("simulation"):
        raise BadInput(f"--simulation runs the whole federation in one process; --role {role} is for a SuperLink "
                       "and client nodes on several hosts")
    if values["tls"]:
        raise BadInput(f"--tls makes certificates for 127.0.0.1 only; with --role {role} give --certs DIR "
                       "(made by launchers/make-certs.sh for the server's host)")
    if role == "nodes":
        for name in ("port", "host"):
            if name in given:
                raise BadInput(
                    f"--{name} is for the server's SuperLink; --role nodes connects to --superlink HOST:PORT"
                )
        superlink = values.get("superlink")
        if not superlink:
            raise BadInput("--role nodes needs --superlink HOST:PORT: the SuperLink its client nodes connect to")
        if not is_host_port(str(superlink)):
            raise BadInput(f"--superlink {superlink!r} is not HOST:PORT")


def _read_partitions(text: str | None, nodes: int) -> list[int]:
    """--partitions I,J,...: distinct partition ids below ``nodes`` (CLIENTS); all of them when not given."""
    from fedgpu.errors import BadInput

    if text is None:
        return list(range(nodes))
    ids: list[int] = []
    for part in str(text).split(","):
        if not (part.isascii() and part.isdigit()):
            raise BadInput(f"--partitions must be partition ids such as 0,3,6, got {text!r}")
        if len(part) > len(str(nodes)) + 1 or int(part) >= nodes:
            raise BadInput(f"--partitions: partition {part} is not below the {nodes} clients (ids 0 to {nodes - 1})")
        if int(part) in ids:
            raise BadInput(f"--partitions: partition {int(part)} given twice")
        ids.append(int(part))
    return ids


def _check_certs(directory: str | None, role: str, partitions: list[int]) -> Path | None:
    """--certs DIR: the files this role needs, as launchers/make-certs.sh writes them."""
    from fedgpu.errors import BadInput

    if not directory:
        return None
    certs = Path(directory).absolute()
    if role == "server":
        needed = ["ca.crt", "server.pem", "server.key", "nodes"]
    else:
        needed = ["ca.crt", *(f"nodes/node-{i}" for i in partitions)]
    for name in needed:
        if not (certs / name).exists():
            raise BadInput(f"--certs {directory}: no {name} there "
                           "(launchers/make-certs.sh DIR --nodes N --host SERVER_HOST "
                           "makes them)")
    return certs


def _check_simulation_options(values: dict[str, Any], given: set[str], simulated: bool) -> None:
    """Options that only a simulation takes, or that a simulation cannot take; BadInput names the first."""
    from fedgpu.errors import BadInput

    if not simulated:
        if "workers" in given:
            raise BadInput("--workers is for --simulation (client nodes take one message at a time each)")
        return
    if not values["mp"]:
        raise BadInput("--no-mp: a simulation runs every message in a child; --no-mp is for client nodes")
    for name in ("port", "tls", "host"):
        if name in given:
            raise BadInput(f"--{name} is for a SuperLink; a simulation has none")


def simulation_workers(federation: Any = None, cpus: int | None = None, gpus: int | None = None) -> int:
    """Messages in flight at once in a simulation, as Flower's Simulation Engine counts its actors.

    With the app's ``client-resources``: one per ``num-cpus`` of this host's
    cores, and, where it asks for GPUs and there are some, at most ``num-gpus``
    of a GPU each (0.25: four per GPU). Without: one per core.
    """
    if cpus is None:
        from fedgpu.plans.server import usable_cores

        cpus = usable_cores()
    num_cpus = getattr(federation, "num_cpus", None)
    num_gpus = getattr(federation, "num_gpus", None)
    workers = max(1, int(cpus // num_cpus)) if num_cpus else cpus
    if num_gpus:
        if gpus is None:
            from fedgpu.nvml.devices import open_nvml

            nvml, _ = open_nvml()
            gpus = 0
            if nvml is not None:
                gpus = nvml.count()
                nvml.close()
        if gpus:
            workers = min(workers, max(1, int(gpus // num_gpus)))
    return workers
