"""A whole federation on this host: ``fedgpu run`` (``./run.sh`` calls it too).

One process owns everything it starts: the server (a SuperLink and the run's
submission, ``fedgpu server``), the host's zygote and N client nodes. Each is
the leader of a process group of its own and dies with us (parent-death
signal); on exit, Ctrl-C or TERM every group gets TERM, a grace period, then
KILL. fedgpu's own tasks and any Flower app directory are served the same way:
only the server's submission and the zygote's warm-up differ.

A role splits the federation over hosts (a Slurm job's steps): ``--role server``
starts the SuperLink and the run only; ``--role nodes`` the host's zygote and
some of the client nodes, against another host's SuperLink. Each owns what it
starts as the whole run does.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedgpu.flower.internals.marks import SUPERNODE_REGISTERED_MARK
from fedgpu.isolation.procs import group_alive, stop_groups, wait_until
from fedgpu.names import APP_CHECKED_ENV, FLOWER_DEFAULTS, RUN_DIR_ENV, ZYGOTE_ENV
from fedgpu.shape import DEFAULT_NODES, read_positional

GRACE_SECONDS = 5.0
SERVER_GRACE_SECONDS = 8.0  # the server writes the reports of a stopped run (memory.png too) before it exits
READY_TIMEOUT_SECONDS = 120.0
WATCH_SECONDS = 0.5
WATCH_MARGIN_SECONDS = 30.0  # past --start-timeout, before the launcher itself gives up on unregistered nodes
WAVE_PER_CORE = 4  # nodes started at once per core, each wave registered before the next


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


class Stopping(Exception):
    """A signal arrived: stop everything and exit 128 + signum."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class RunEnded(Exception):
    """The run ended early with this exit code and this line."""

    def __init__(self, code: int, line: str) -> None:
        super().__init__(line)
        self.code, self.line = code, line


def fedgpu_command() -> list[str]:
    """How to run fedgpu's CLI in a child: the ``fedgpu`` script of this environment.

    Its command line reads ``fedgpu client ...``: the memory monitor tells a
    run's processes apart by it.
    """
    script = Path(sys.executable).parent / "fedgpu"
    return [str(script)] if script.exists() else [sys.executable, "-m", "fedgpu.cli"]


def certs_script() -> Path:
    return Path(__file__).resolve().parent.parent / "launchers" / "make-certs.sh"


class Launcher:
    def __init__(self, plan: LaunchPlan, say: Callable[[str], None], warn: Callable[[str], None]) -> None:
        self.plan = plan
        self.say = say  # progress, on stdout with the rounds
        self.warn = warn  # why the run stopped, on stderr
        self.groups: list[subprocess.Popen] = []  # leaders of the groups we started, in order
        self.nodes: list[subprocess.Popen] = []
        self.zygote: subprocess.Popen | None = None
        self.server: subprocess.Popen | None = None
        self.private_dir: str | None = None
        self.zygote_dir: str | None = None
        self.doorbells: str | None = None
        self.certs: Path | None = None

    # -- the whole run -----------------------------------------------------------

    def run(self) -> int:
        """Start everything, wait for the server, stop everything; the exit code."""
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._on_signal)
        received = signal.SIGTERM  # what the server is stopped with: the signal we got, so that its report names it
        try:
            return self._run()
        except Stopping as stopped:
            what = {"server": "the server", "nodes": "this host's client nodes"}.get(self.plan.role, "the federation")
            self.warn(f"{self.plan.prog}: {stopped} received, stopping {what}")
            received = stopped.signum
            return 128 + stopped.signum
        except RunEnded as ended:
            self.warn(f"{self.plan.prog}: {ended.line}")
            return ended.code
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, signal.SIG_IGN)  # the clean-up itself is not interrupted
            self.stop_all(server_signal=received)

    def _on_signal(self, signum: int, _frame: object) -> None:
        raise Stopping(signum)

    def _run(self) -> int:
        from fedgpu.names import DOORBELLS_ENV, PRIVATE_DIR_ENV, RUN_TOKEN_ENV
        from fedgpu.private_dirs import make_private_dir, subdir, sweep_dead

        plan = self.plan
        os.environ.update({RUN_DIR_ENV: str(plan.run_dir), **FLOWER_DEFAULTS})
        # Every answer of our SuperLink carries this token: a probe answered by another run's is not ours.
        os.environ[RUN_TOKEN_ENV] = secrets.token_hex(16)
        sweep_dead()  # what runs killed with SIGKILL left in the temporary folder
        # Sockets and helper scripts of the run, in one 0700 directory removed at the end.
        self.private_dir = make_private_dir("run")
        os.environ[PRIVATE_DIR_ENV] = self.private_dir
        if plan.tls:
            self._make_certs()
        self.certs = plan.certs or self.certs
        self.say(f"{plan.prog}: {plan.describe()}")
        if plan.role == "all":
            # The SuperLink rings a node here when it stores a message for it (no 3 s polling floor).
            self.doorbells = subdir(self.private_dir, "bells")
            os.environ[DOORBELLS_ENV] = self.doorbells
        if plan.zygote_args and plan.role != "server":
            self._start_zygote()
        if plan.role != "nodes":
            self._start_server()
        if plan.simulated:
            self.say(f"{plan.prog}: simulation started; logs in {plan.run_dir}")
        elif plan.role == "server":
            self.say(f"{plan.prog}: server started; logs in {plan.run_dir}")
        elif plan.role == "nodes":
            self._start_nodes()
            self.say(f"{plan.prog}: {len(self.nodes)} client nodes started; logs in {plan.logs}")
            return self._watch_nodes()
        else:
            self._start_nodes()
            self.say(f"{plan.prog}: server and {plan.nodes} client nodes started; logs in {plan.run_dir}")
        return self._watch()

    # -- starting ---------------------------------------------------------------

    def _spawn(self, argv: list[str], *, stdout: object, stderr: object, env: dict[str, str] | None = None) -> subprocess.Popen:
        # In the run directory: whatever an app writes to its working directory lands with the run's outputs.
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, start_new_session=True, cwd=self.plan.logs,
            env=None if env is None else {**os.environ, **env},
        )
        self.groups.append(proc)
        return proc

    def _log(self, name: str):
        from fedgpu.output import OutputError, open_output

        try:
            return open_output(self.plan.logs / name, "ab")
        except OutputError as err:
            raise RunEnded(1, str(err)) from None

    def _make_certs(self) -> None:
        self.certs = self.plan.run_dir / "certs"
        done = subprocess.run([str(certs_script()), str(self.certs), "--nodes", str(self.plan.nodes)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RunEnded(1, f"could not create certificates in {self.certs}: {(done.stderr or done.stdout).strip()}")

    def _start_zygote(self) -> None:
        # One warm zygote for the host: every client node (and the server's own
        # evaluation) forks its children from it. It warms up while the rest start.
        assert self.private_dir is not None
        self.zygote_dir = os.path.join(self.private_dir, "zygote")  # the zygote makes it, 0700
        os.environ[ZYGOTE_ENV] = self.zygote_dir
        from fedgpu.names import ZYGOTE_SPARES_ENV

        # A simulation's workers ask at once: as many primed spares as workers.
        spares = {ZYGOTE_SPARES_ENV: str(self.plan.workers)} if self.plan.simulated else None
        with self._log("zygote.log") as log:
            self.zygote = self._spawn(
                [*fedgpu_command(), "zygote", "--dir", self.zygote_dir, *self.plan.zygote_args, "--parent-pid", str(os.getpid())],
                stdout=log, stderr=subprocess.STDOUT, env=spares,
            )

    def _start_server(self) -> None:
        plan = self.plan
        argv = [*fedgpu_command(), "server", *plan.server_args, "--run-dir", str(plan.run_dir), "--parent-pid", str(os.getpid())]
        if not plan.simulated:
            argv += ["--port", str(plan.port)]
        if self.certs is not None:
            argv += ["--ssl-ca-certfile", str(self.certs / "ca.crt"), "--ssl-certfile", str(self.certs / "server.pem"),
                     "--ssl-keyfile", str(self.certs / "server.key"), "--auth-public-keys", str(self.certs / "nodes")]
        with self._log("server.log") as log:
            self.server = self._spawn(argv, stdout=None, stderr=log)  # its rounds and summary on our console
        if plan.simulated:
            return  # no SuperLink to wait for: the server hosts the simulation
        from fedgpu.flower.internals import EXIT_PORT_TAKEN
        from fedgpu.names import RUN_TOKEN_ENV
        from fedgpu.net import reach_host, wait_for_health

        scheme = "https" if self.certs is not None else "http"
        ca = str(self.certs / "ca.crt") if self.certs is not None else None
        if not wait_for_health(f"{scheme}://{reach_host(plan.host)}:{plan.port}/health", READY_TIMEOUT_SECONDS,
                               alive=lambda: self.server.poll() is None, ca_file=ca, token=os.environ[RUN_TOKEN_ENV]):
            code = self.server.wait(GRACE_SECONDS) if self.server.poll() is not None else 1
            if code == EXIT_PORT_TAKEN:  # another run (or program) bound the port first
                raise RunEnded(code, f"port {plan.port} on 127.0.0.1 is in use")
            raise RunEnded(code or 1, f"server failed (exit {code}): {_last_line(plan.run_dir / 'server.log')}")
        # With node authentication, the server registers the nodes' keys after the SuperLink answers.
        if self.certs is not None:
            deadline = time.monotonic() + READY_TIMEOUT_SECONDS
            while "SuperLink ready on" not in _read(plan.run_dir / "server.log"):
                if self.server.poll() is not None or time.monotonic() > deadline:
                    raise RunEnded(self.server.poll() or 1, f"server failed: {_last_line(plan.run_dir / 'server.log')}")
                time.sleep(0.2)

    def _start_nodes(self) -> None:
        plan = self.plan
        # In waves, each registered before the next starts: a hundred interpreters
        # importing Flower at once on a small host starve the SuperLink, registrations
        # time out, and Flower's retry of a registration that did go through is refused.
        wave = (os.cpu_count() or 2) * WAVE_PER_CORE
        superlink = plan.superlink or f"127.0.0.1:{plan.port}"
        ids = plan.node_ids()
        for started, i in enumerate(ids, 1):
            argv = [*fedgpu_command(), "client", "--superlink", superlink, "--partition-id", str(i),
                    "--num-partitions", str(plan.nodes), "--parent-pid", str(os.getpid()), *plan.node_args]
            if self.certs is not None:
                argv += ["--root-certificates", str(self.certs / "ca.crt"), "--auth-private-key", str(self.certs / "nodes" / f"node-{i}")]
            with self._log(f"client-{i}.log") as log:
                self.nodes.append(self._spawn(argv, stdout=log, stderr=subprocess.STDOUT))
            if started % wave == 0 and started < len(ids):
                self._wait_registered(range(started - wave, started), time.monotonic() + READY_TIMEOUT_SECONDS)

    def registered(self, i: int) -> bool:
        """Whether the client node of partition ``i`` has registered with the SuperLink."""
        return SUPERNODE_REGISTERED_MARK in _read(self.plan.logs / f"client-{i}.log")

    def _wait_registered(self, positions: range, deadline: float) -> None:
        ids = self.plan.node_ids()
        for n in positions:
            while time.monotonic() < deadline and self.nodes[n].poll() is None and not self.registered(ids[n]):
                time.sleep(0.2)

    # -- watching -----------------------------------------------------------------

    def _watch(self) -> int:
        """Until the server exits; a run cannot finish without its zygote or with too few nodes."""
        plan = self.plan
        assert self.server is not None
        started = time.monotonic()
        waiting_for_nodes = True
        while self.server.poll() is None:
            if self.zygote is not None and self.zygote.poll() is not None:
                raise RunEnded(1, f"the zygote exited: {_last_line(plan.run_dir / 'zygote.log')}; see {plan.run_dir / 'zygote.log'}")
            alive = sum(node.poll() is None for node in self.nodes)
            if alive < plan.needed_alive:
                raise RunEnded(1, f"only {alive} of {plan.nodes} client nodes are alive, fewer than the {plan.needed_alive} "
                                  f"{plan.needed_as}; see {plan.run_dir}/client-*.log")
            if waiting_for_nodes and plan.start_timeout is not None:
                registered = sum(self.registered(i) for i in range(plan.nodes))
                waiting_for_nodes = registered < plan.nodes
                # The server says it first (it counts the nodes on the SuperLink); this is for a server that cannot.
                if waiting_for_nodes and time.monotonic() - started > plan.start_timeout + WATCH_MARGIN_SECONDS:
                    raise RunEnded(3, f"only {registered} of {plan.nodes} client nodes registered within "
                                      f"{plan.start_timeout:g} s; see {plan.run_dir}/client-*.log")
            time.sleep(WATCH_SECONDS)
        code = self.server.wait()
        if code != 0:
            self.warn(f"{plan.prog}: run failed (exit {code}); logs in {plan.run_dir}: serverapp.log (the ServerApp), server.log")
        return code

    def _watch_nodes(self) -> int:
        """--role nodes: until stopped (TERM, INT); a client node never exits on its own, nor the zygote."""
        logs = self.plan.logs
        while True:
            if self.zygote is not None and self.zygote.poll() is not None:
                raise RunEnded(1, f"the zygote exited: {_last_line(logs / 'zygote.log')}; see {logs / 'zygote.log'}")
            for i, node in zip(self.plan.node_ids(), self.nodes):
                if node.poll() is not None:
                    log = logs / f"client-{i}.log"
                    raise RunEnded(1, f"client node {i} exited with {node.returncode}: {_last_line(log)}; see {log}")
            time.sleep(WATCH_SECONDS)

    # -- stopping -----------------------------------------------------------------

    def stop_all(self, server_signal: int = signal.SIGTERM) -> None:
        """TERM every group we started (the server: ``server_signal``), wait, KILL what is left; reap; clean up.

        The others get GRACE_SECONDS, the server SERVER_GRACE_SECONDS: it
        writes the stopped run's reports once its SuperLink is gone.
        """
        leaders = {proc.pid: proc for proc in self.groups}
        server = () if self.server is None else (self.server.pid,)

        def exited(pgid: int, timeout: float) -> bool:
            # poll() reaps a leader that exited, so that its group counts only the living.
            return wait_until(lambda: leaders[pgid].poll() is not None and not group_alive(pgid), timeout)

        stop_groups(leaders, GRACE_SECONDS, exited=exited, grace_of=dict.fromkeys(server, SERVER_GRACE_SECONDS),
                    signal_of=dict.fromkeys(server, server_signal))
        for proc in self.groups:
            try:
                proc.wait(GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                pass
        self.groups = []
        if self.private_dir:
            shutil.rmtree(self.private_dir, ignore_errors=True)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _last_line(path: Path) -> str:
    lines = [line for line in _read(path).splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


# -- checking `fedgpu run` ----------------------------------------------------------


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
    from fedgpu.flower.server_plan import check_task_run
    from fedgpu.net import free_port, port_free
    from fedgpu.nvml.placement import check_placement
    from fedgpu.run_dir import prepare_run_dir

    values = dict(options)
    read_positional(values, given, numbers_only=prog != "fedgpu")
    mp, app_dir, simulated = bool(values["mp"]), values.get("app_dir"), bool(values.get("simulation"))
    role = str(values.get("role") or "all")
    _check_role_options(values, given, role)
    _check_simulation_options(values, given, simulated)
    task_only = {"rounds", "min_clients", "sampled", "eval_sampled", "task", "lr", "lr_decay", "local_epochs", "batch_size",
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
        server_args=server_argv({**server_values, **placement, "isolation": values["isolation"], "umask": f"{values['umask']:03o}"}),
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
                raise BadInput(f"--{name} is for the server's SuperLink; --role nodes connects to --superlink HOST:PORT")
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
            raise BadInput(f"--certs {directory}: no {name} there (launchers/make-certs.sh DIR --nodes N --host SERVER_HOST "
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
        from fedgpu.flower.server_plan import usable_cores

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
