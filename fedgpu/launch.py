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

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from fedgpu.flower.internals.marks import SUPERNODE_REGISTERED_MARK
from fedgpu.isolation.procs import group_alive, stop_groups, wait_until
from fedgpu.names import FLOWER_DEFAULTS, RUN_DIR_ENV, ZYGOTE_ENV
from fedgpu.plans.run import LaunchPlan

GRACE_SECONDS = 5.0
SERVER_GRACE_SECONDS = 8.0  # the server writes the reports of a stopped run (memory.png too) before it exits
READY_TIMEOUT_SECONDS = 120.0
WATCH_SECONDS = 0.5
WATCH_MARGIN_SECONDS = 30.0  # past --start-timeout, before the launcher itself gives up on unregistered nodes
WAVE_PER_CORE = 4  # nodes started at once per core, each wave registered before the next
PORT_PICKS = 3  # ports the launcher tries when it picked the port and another process bound it first


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

    def _spawn(
        self, argv: list[str], *, stdout: object, stderr: object, env: dict[str, str] | None = None
    ) -> subprocess.Popen:
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
                [*fedgpu_command(), "zygote", "--dir", self.zygote_dir, *self.plan.zygote_args,
                 "--parent-pid", str(os.getpid())],
                stdout=log, stderr=subprocess.STDOUT, env=spares,
            )

    def _start_server(self) -> None:
        plan = self.plan
        for pick in range(1, PORT_PICKS + 1):
            taken = self._start_server_on(plan.port)
            if not taken:
                break
            if not plan.port_picked or pick == PORT_PICKS:
                raise RunEnded(taken, f"port {plan.port} on 127.0.0.1 is in use")
            # The port we picked was free then; another process bound it before the SuperLink did. Nobody has
            # been told this port yet: pick another.
            from fedgpu.net import free_port

            old, plan.port = plan.port, free_port()
            with self._log("server.log") as log:
                log.write(f"[fedgpu] port {old} was taken before the SuperLink bound it; "
                          f"starting again on port {plan.port}\n".encode())
        if plan.simulated:
            return
        # With node authentication, the server registers the nodes' keys after the SuperLink answers.
        if self.certs is not None:
            deadline = time.monotonic() + READY_TIMEOUT_SECONDS
            while "SuperLink ready on" not in _read(plan.run_dir / "server.log"):
                if self.server.poll() is not None or time.monotonic() > deadline:
                    raise RunEnded(self.server.poll() or 1, f"server failed: {_last_line(plan.run_dir / 'server.log')}")
                time.sleep(0.2)

    def _start_server_on(self, port: int) -> int:
        """Start the server; 0 once its SuperLink answers on ``port``, the server's exit code if the port was taken."""
        plan = self.plan
        argv = [*fedgpu_command(), "server", *plan.server_args, "--run-dir", str(plan.run_dir),
                "--parent-pid", str(os.getpid())]
        if not plan.simulated:
            argv += ["--port", str(port)]
        if self.certs is not None:
            argv += ["--ssl-ca-certfile", str(self.certs / "ca.crt"), "--ssl-certfile", str(self.certs / "server.pem"),
                     "--ssl-keyfile", str(self.certs / "server.key"), "--auth-public-keys", str(self.certs / "nodes")]
        with self._log("server.log") as log:
            self.server = self._spawn(argv, stdout=None, stderr=log)  # its rounds and summary on our console
        if plan.simulated:
            return 0  # no SuperLink to wait for: the server hosts the simulation
        from fedgpu.flower.internals import EXIT_PORT_TAKEN
        from fedgpu.names import RUN_TOKEN_ENV
        from fedgpu.net import reach_host, wait_for_health

        scheme = "https" if self.certs is not None else "http"
        ca = str(self.certs / "ca.crt") if self.certs is not None else None
        server = self.server
        if wait_for_health(f"{scheme}://{reach_host(plan.host)}:{port}/health", READY_TIMEOUT_SECONDS,
                           alive=lambda: server.poll() is None, ca_file=ca, token=os.environ[RUN_TOKEN_ENV]):
            return 0
        code = server.wait(GRACE_SECONDS) if server.poll() is not None else 1
        if code == EXIT_PORT_TAKEN:  # another run (or program) bound the port first
            return code
        raise RunEnded(code or 1, f"server failed (exit {code}): {_last_line(plan.run_dir / 'server.log')}")

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
                argv += ["--root-certificates", str(self.certs / "ca.crt"),
                         "--auth-private-key", str(self.certs / "nodes" / f"node-{i}")]
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
                log = plan.run_dir / "zygote.log"
                raise RunEnded(1, f"the zygote exited: {_last_line(log)}; see {log}")
            alive = sum(node.poll() is None for node in self.nodes)
            if alive < plan.needed_alive:
                raise RunEnded(1, f"only {alive} of {plan.nodes} client nodes are alive, fewer than the "
                                  f"{plan.needed_alive} {plan.needed_as}; see {plan.run_dir}/client-*.log")
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
            self.warn(f"{plan.prog}: run failed (exit {code}); logs in {plan.run_dir}: "
                      "serverapp.log (the ServerApp), server.log")
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
