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
slow the push itself). :func:`superlink_main` starts Flower's SuperLink so that
its SuperExec starts every ServerApp this way, ours or a user's.
"""

from __future__ import annotations

import ast
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
from typing import Any

# Where the doorbells of one host's nodes live (a private directory the launcher makes).
DOORBELLS_ENV = "FEDGPU_DOORBELLS"
# Set to "flower" to keep Flower's own pace (the benchmarks' "before").
PACE_ENV = "FEDGPU_NODE_PACE"

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


def sleep_contract(module: ModuleType, expected: tuple[tuple[str, float], ...], time_uses: set[str] | None = None) -> list[str]:
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
                    sleeps.append((function, arg.value if isinstance(arg, ast.Constant) else ast.unparse(arg) if arg else None))
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
    return [f"{fn.__name__} has initial_backoff {(fn.__kwdefaults__ or {}).get('initial_backoff')!r}, expected {flowers}"
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
            bell.bind(str(path))
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
        caller = sys._getframe(1)
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
            self._sender.sendto(b"!", os.path.join(self.directory, str(node_id)))
            return True
        except OSError:  # a node of another host, gone, or its bell already full: it polls
            return False


def serverapp_main(argv: list[str]) -> None:
    """``flwr-serverapp`` as the SuperExec of our SuperLink starts it for every run: its rounds recorded, a wait
    for nodes that will never come ended, and its grid paced (unless $FEDGPU_NODE_PACE keeps Flower's pace)."""
    from flwr.superlink.cli.flwr_serverapp import flwr_serverapp

    def log(line: str) -> None:
        print(f"[fedgpu] {line}", file=sys.stderr, flush=True)

    if os.environ.get(PACE_ENV) != "flower":
        pace_grid(log=log, doorbells=os.environ.get(DOORBELLS_ENV))
    record_app_rounds(log=log)
    watch_node_waits(log=log)
    sys.argv = ["flwr-serverapp", *argv]  # Flower's exit handling knows the process by this name
    flwr_serverapp()


# -- who may reach the SuperLink and the SuperNodes ------------------------------------------

# What other hosts may ask of a run's SuperLink: the Fleet API (TLS and SuperNode
# authentication protect it) and the health probe. Control and ServerAppIo answer
# only the owner's processes on the SuperLink's own host.
FLEET_PATHS = ("/v1/fleet/", "/health")
EXIT_PORT_TAKEN = 2  # the SuperLink could not bind its port: another run (or program) has it


def guard_app_factory(module: ModuleType, remote_paths: tuple[str, ...], token: str | None = None) -> None:
    """Every app ``module.create_app`` makes (Flower's SuperLink or SuperNode) answers only the owner.

    Fails closed: if Flower's factory is not what this expects, nothing is served.
    """
    from fedgpu.owner_only import OwnerOnly, peer_lookup_problem

    problem = peer_lookup_problem()
    if problem:
        raise RuntimeError(f"fedgpu cannot tell the owner's connections from others': {problem}; not serving")
    create_app = getattr(module, "create_app", None)
    if not callable(create_app):
        raise RuntimeError(f"{module.__name__}.create_app is gone: fedgpu cannot guard this Flower version's API")

    def guarded_create_app(*args, **kwargs):  # Flower's signature
        app = create_app(*args, **kwargs)
        app.add_middleware(OwnerOnly, remote_paths=remote_paths, token=token)  # outermost: before Flower's own
        return app

    module.create_app = guarded_create_app


def guard_supernode_runtime() -> None:
    """The Runtime API of a SuperNode in this process answers only the owner's processes on this host."""
    from flwr.supernode import main as supernode_main

    guard_app_factory(supernode_main, remote_paths=())


def bind_listener(host: str, port: int) -> socket.socket:
    """The SuperLink's listening socket, bound before Flower starts: a port taken is known at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT of an earlier run is no owner
    try:
        sock.bind((host.strip("[]"), port))
        # Listening at once: Linux lets two SO_REUSEADDR sockets bind one port until one listens.
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


class _BoundUvicorn:
    """Stands in for ``uvicorn`` in Flower's SuperLink CLI: serves on the socket bound beforehand."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def run(self, app: object, **options: object) -> None:
        import uvicorn

        config = uvicorn.Config(app, **options)  # type: ignore[arg-type]
        config.load_app()
        host, port = self._sock.getsockname()[:2]
        scheme = "https" if options.get("ssl_certfile") else "http"
        # uvicorn says where it runs only for sockets it bound itself.
        print(f"[fedgpu] SuperLink listening on {scheme}://{host}:{port}", file=sys.stderr, flush=True)
        uvicorn.Server(config).run(sockets=[self._sock])

    def __getattr__(self, name: str) -> object:
        import uvicorn

        return getattr(uvicorn, name)


def private_bin_dir() -> str:
    """Where the ServerApp wrapper goes: the run's private directory (made here when run alone)."""
    from fedgpu.private_dirs import PRIVATE_DIR_ENV, make_private_dir, subdir

    if not os.environ.get(PRIVATE_DIR_ENV):
        os.environ[PRIVATE_DIR_ENV] = make_private_dir("superlink")  # swept by the next run once we are gone
    return subdir(os.environ[PRIVATE_DIR_ENV], "bin")


def _option(argv: list[str], name: str, default: str) -> str:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return default


# -- the SuperLink: how the ServerApps are started ------------------------------------------


def superlink_main(argv: list[str]) -> None:
    """Flower's SuperLink, guarded and paced.

    Its port is bound first (taken: one line, exit 2); every request from
    another uid on this host, and every request but the Fleet API's from other
    hosts, is refused; every answer carries this run's token ($FEDGPU_RUN_TOKEN)
    so that a probe knows it reached this SuperLink. Its ServerApps (any app's)
    are recorded, paced and ring the doorbells in $FEDGPU_DOORBELLS (paced only
    while $FEDGPU_NODE_PACE is not "flower"): the SuperExec finds
    ``flwr-serverapp`` on PATH, and a private directory first on PATH makes
    that :func:`serverapp_main`.
    """
    import importlib

    from flwr.superlink import main as superlink_app

    from fedgpu.owner_only import RUN_TOKEN_ENV

    host, port = _option(argv, "--host", "0.0.0.0"), int(_option(argv, "--port", "8000"))
    try:
        sock = bind_listener(host, port)
    except OSError as err:
        print(f"[fedgpu] error: port {port} on {host} is in use ({err.strerror or err})", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_PORT_TAKEN) from None
    guard_app_factory(superlink_app, remote_paths=FLEET_PATHS, token=os.environ.get(RUN_TOKEN_ENV))
    # The module, not the function of the same name that flwr.superlink.cli exports.
    superlink_cli = importlib.import_module("flwr.superlink.cli.flower_superlink")
    superlink_cli.uvicorn = _BoundUvicorn(sock)  # type: ignore[attr-defined]
    bin_dir = private_bin_dir()
    wrapper = Path(bin_dir, "flwr-serverapp")
    # A Python script, so that the process reads "flwr-serverapp" as Flower's own does.
    wrapper.write_text(f"#!{sys.executable}\nimport sys\nfrom fedgpu.flower.internals import serverapp_main\n"
                       "serverapp_main(sys.argv[1:])\n")
    wrapper.chmod(0o700)
    os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    sys.argv = ["flower-superlink", *argv]
    superlink_cli.flower_superlink()


# -- a user's app, packaged as `flwr run` packages it ------------------------------------------


def build_fab(app_dir: str | os.PathLike) -> bytes:
    """The FAB (a zip) that ``flwr run APP_DIR`` builds and submits; the directory is only read.

    Flower's builder keeps what the nodes need (its include and exclude rules,
    the app's .gitignore) and leaves ``[tool.flwr.federations]`` out of the
    FAB's pyproject.toml, so `flwr run` on the unpacked FAB has nothing to
    migrate into the user's file. ValueError (or OSError) says why an app cannot
    be packaged: an invalid config, a path nested too deep, over 10 MB.
    """
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(Path(app_dir))



# -- a user's ServerApp, round by round (fedgpu.flower.app_rounds) ----------------------------

_app_rounds = None  # the AppRounds of the ServerApp running in this process


def app_rounds_contract() -> list[str]:
    """What differs in Flower's ServerApp, Strategy and DefaultWorkflow from what :func:`record_app_rounds` hooks."""
    from flwr.server.workflow import DefaultWorkflow
    from flwr.serverapp import ServerApp
    from flwr.serverapp.strategy import Result, Strategy

    problems = []
    for name, function, wanted in (
        ("ServerApp.__call__", ServerApp.__call__, ["self", "grid", "context"]),
        ("DefaultWorkflow.__call__", DefaultWorkflow.__call__, ["self", "grid", "context"]),
        ("Strategy.configure_train", Strategy.configure_train, ["self", "server_round", "arrays", "config", "grid"]),
        ("Strategy.aggregate_train", Strategy.aggregate_train, ["self", "server_round", "replies"]),
        ("Strategy.aggregate_evaluate", Strategy.aggregate_evaluate, ["self", "server_round", "replies"]),
    ):
        if list(inspect.signature(function).parameters) != wanted:
            problems.append(f"{name} no longer takes ({', '.join(wanted)})")
    start = list(inspect.signature(Strategy.start).parameters)
    if start[:4] != ["self", "grid", "initial_arrays", "num_rounds"] or "evaluate_fn" not in start:
        problems.append("Strategy.start no longer takes (grid, initial_arrays, num_rounds, ..., evaluate_fn)")
    if not {"arrays", "evaluate_metrics_serverapp"} <= set(getattr(Result, "__dataclass_fields__", {})):
        problems.append("Result has no arrays and evaluate_metrics_serverapp")
    return problems


def record_app_rounds(log: Callable[[str], None]) -> bool:
    """Hook Flower in this (ServerApp) process: a user's app gets metrics.csv, a line per round and model.npz.

    False (and why, logged) outside a fedgpu run, or where Flower is not the
    one hooked here: the app then runs without them. fedgpu's own ServerApp
    records its rounds itself and is left alone.
    """
    from fedgpu.monitor.events import RUN_DIR_ENV

    run_dir = os.environ.get(RUN_DIR_ENV)
    if not run_dir:
        return False
    import flwr
    from flwr.server import History
    from flwr.server.workflow import DefaultWorkflow
    from flwr.serverapp import ServerApp
    from flwr.serverapp.strategy import Strategy

    try:
        problems = app_rounds_contract()
        if not problems:
            _record_legacy_workflow(DefaultWorkflow, log)
            _record_legacy_history(History)
            _record_strategy(Strategy, log)
            _record_server_app(ServerApp, run_dir, log)  # last: the others do nothing without it
    except Exception as err:  # noqa: BLE001 - never the app's problem
        problems = [f"{type(err).__name__}: {err}"]
    if problems:
        log(f"flwr {flwr.__version__}: the ServerApp is not the one fedgpu records ({'; '.join(problems)}); "
            "no metrics.csv or round lines for this app")
        return False
    return True


def _tell(log: Callable[[str], None], what: Callable[..., Any], *args: Any) -> Any:
    """A call into the recorder: its own error is logged, never the app's problem."""
    try:
        return what(*args)
    except Exception as err:  # noqa: BLE001
        log(f"could not record the rounds ({getattr(what, '__name__', what)}: {type(err).__name__}: {err})")
        return None


def _record_server_app(server_app_class: type, run_dir: str, log: Callable[[str], None]) -> None:
    from fedgpu.flower.app_rounds import AppRounds

    call = server_app_class.__call__

    def call_and_record(self, grid, context):  # Flower's signature
        global _app_rounds
        ours = sys.modules.get("fedgpu.flower.server_app")
        if _app_rounds is not None or (ours is not None and self is getattr(ours, "app", None)):
            return call(self, grid, context)  # fedgpu's own ServerApp records its rounds itself
        planned = context.run_config.get("num-server-rounds")
        rounds = _app_rounds = AppRounds(run_dir, planned if isinstance(planned, int) else None)
        _watch_grid(grid, rounds, log)
        try:
            return call(self, grid, context)
        finally:  # the round that was running when the app returned, or raised, is still a row
            _tell(log, rounds.close)
            _app_rounds = None

    server_app_class.__call__ = call_and_record


def _watch_grid(grid: Any, rounds: Any, log: Callable[[str], None]) -> None:
    """Count every message the app pushes and every reply it pulls through this Grid."""
    from fedgpu.flower.app_rounds import server_round_of

    push, pull = grid.push_messages, grid.pull_messages

    def push_and_count(messages):  # Flower's signature
        messages = list(messages)
        numbers = [n for n in (server_round_of(m) for m in messages) if n is not None and n >= 1]
        if numbers:
            _tell(log, rounds.begin, max(numbers))  # before the push: the round's first message starts it
        ids = list(push(messages))
        _tell(log, rounds.pushed, messages, ids)
        return ids

    def pull_and_count(message_ids):
        replies = list(pull(message_ids))
        _tell(log, rounds.pulled, replies)
        return replies

    grid.push_messages, grid.pull_messages = push_and_count, pull_and_count


def _record_strategy(strategy_class: type, log: Callable[[str], None]) -> None:
    """``Strategy.start`` tells the recorder where rounds begin and what each aggregated; bad replies are named."""
    from fedgpu.flower.app_rounds import BAD_REPLY, client_of, diagnose_replies

    start = strategy_class.start
    signature = inspect.signature(start)

    def start_and_record(self, *args, **kwargs):
        rounds = _app_rounds
        if rounds is None or rounds.in_strategy:
            return start(self, *args, **kwargs)  # not a user's app, or a strategy started inside another's start
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        num_rounds, evaluate_fn = bound.arguments["num_rounds"], bound.arguments["evaluate_fn"]
        if isinstance(num_rounds, int):
            rounds.num_rounds = num_rounds
        model: dict[int, Any] = {}

        def configure_train(server_round, arrays, config, grid):
            _tell(log, rounds.begin, server_round)
            model[server_round] = arrays
            return strategy_call("configure_train", server_round, arrays, config, grid)

        def aggregate(kind: str, name: str, server_round: int, replies: Any) -> Any:
            replies = list(replies)
            try:
                return strategy_call(name, server_round, replies)
            except Exception as err:
                _tell(log, name_bad_replies, kind, name, server_round, replies, model.get(server_round), err)
                raise

        def aggregate_train(server_round, replies):
            arrays, metrics = aggregate("train", "aggregate_train", server_round, replies)
            _tell(log, rounds.aggregated, server_round, "train", metrics)
            return arrays, metrics

        def aggregate_evaluate(server_round, replies):
            metrics = aggregate("evaluate", "aggregate_evaluate", server_round, replies)
            _tell(log, rounds.aggregated, server_round, "evaluate", metrics)
            return metrics

        def evaluate_and_record(server_round, arrays):
            metrics = evaluate_fn(server_round, arrays)
            _tell(log, rounds.aggregated, server_round, "server", metrics)
            if server_round >= 1 and rounds.current is not None and rounds.current.number == server_round:
                _tell(log, rounds.end)  # the round's last step in Flower's loop
            return metrics

        def name_bad_replies(kind, name, server_round, replies, arrays, err):
            weighted_by = getattr(self, "weighted_by_key", "num-examples")
            bad = diagnose_replies(replies, arrays if kind == "train" else None, weighted_by)
            for reply, problem in bad:
                rounds.rejected(server_round, kind, reply, client_of(reply), problem)
            first = str(err).strip().splitlines()[0].strip() if str(err).strip() else ""
            detail = f"round {server_round}: {type(self).__name__}.{name} raised {type(err).__name__}: {first}"
            if bad:
                who = ", ".join(f"client {client_of(r)}" if client_of(r) else f"node {r.metadata.src_node_id}"
                                for r, _ in bad)
                detail += f" ({BAD_REPLY} from {who})"
            else:
                detail += " (fedgpu's reply check finds no reply wrong)"
            rounds.failed("aggregation failed", detail)
            rounds.say(f"[fedgpu] {detail}")

        hooked = ("configure_train", "aggregate_train", "aggregate_evaluate")
        originals = {name: getattr(self, name) for name in hooked}

        def strategy_call(name: str, *call_args: Any) -> Any:
            return originals[name](*call_args)

        ours = {"configure_train": configure_train, "aggregate_train": aggregate_train,
                "aggregate_evaluate": aggregate_evaluate}
        try:
            for name, function in ours.items():
                setattr(self, name, function)  # this call of start only; the class stays Flower's
        except (AttributeError, TypeError):  # a strategy with __slots__: rounds from the Grid alone
            ours = {}
        if evaluate_fn is not None:
            bound.arguments["evaluate_fn"] = evaluate_and_record
        rounds.in_strategy = True
        try:
            result = start(*bound.args, **bound.kwargs)
        finally:
            rounds.in_strategy = False
            for name in ours:
                self.__dict__.pop(name, None)
        _tell(log, rounds.end)
        _tell(log, rounds.model, getattr(result, "arrays", None))
        return result

    strategy_class.start = start_and_record


def _record_legacy_workflow(workflow_class: type, log: Callable[[str], None]) -> None:
    """A legacy ``DefaultWorkflow`` (SecAgg+ among them): its History gives each round's metrics."""
    from flwr.server.workflow.constant import MAIN_PARAMS_RECORD

    call = workflow_class.__call__

    def call_and_record(self, grid, context):  # Flower's signature
        rounds = _app_rounds
        if rounds is None:
            return call(self, grid, context)
        rounds.history = getattr(context, "history", None)
        planned = getattr(getattr(context, "config", None), "num_rounds", None)
        if isinstance(planned, int):
            rounds.num_rounds = planned
        evaluate_workflow = self.evaluate_workflow

        def evaluate_then_end(grid, context):  # Flower's Workflow
            evaluate_workflow(grid, context)
            _tell(log, rounds.end)  # a legacy round's last step: its History is complete

        self.evaluate_workflow = evaluate_then_end
        try:
            outcome = call(self, grid, context)
        finally:
            self.evaluate_workflow = evaluate_workflow
        _tell(log, rounds.end)
        _tell(log, rounds.model, context.state.array_records.get(MAIN_PARAMS_RECORD))
        return outcome

    workflow_class.__call__ = call_and_record


def _record_legacy_history(history_class: type) -> None:
    """A legacy ServerApp built with ``server_fn`` keeps its rounds' metrics in a History that Flower's
    ``Server.fit`` makes for itself: the first one made while a user's app runs is the one read."""
    make = history_class.__init__

    def make_and_record(self, *args, **kwargs):
        make(self, *args, **kwargs)
        rounds = _app_rounds
        if rounds is not None and rounds.history is None:
            rounds.history = self

    history_class.__init__ = make_and_record


# -- a user's ServerApp that waits for more nodes than there are ------------------------------

NODES_WAIT_ENV = "FEDGPU_NODES_WAIT_SECONDS"  # `fedgpu server` sets it for a user's app: its --start-timeout
TOO_FEW_NODES_MARK = "[fedgpu] run failed: too few nodes: "  # the server ends the run when a ServerApp says this
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


# -- the client nodes registered on a SuperLink ----------------------------------------------


class RegisteredNodes:
    """Counts the client nodes online on a SuperLink, asking its Control API as `flwr supernode list` does.

    From this process, with one client for every count: the CLI costs about a
    second of CPU per call, taken from nodes that are starting on the same
    cores. ``flwr_home`` holds the connection (``[superlink.NAME]``) to ask.
    """

    def __init__(self, flwr_home: str | os.PathLike, connection: str) -> None:
        self.flwr_home, self.connection = str(flwr_home), connection
        self._client: Any = None

    def online(self) -> int:
        """Nodes registered and not yet deactivated: those a ServerApp's ``grid.get_node_ids()`` returns."""
        from flwr.proto.control_pb2 import ListNodesRequest
        from flwr.supercore.constant import NodeStatus

        if self._client is None:
            self._client = self._connect()
        answer = self._client.ListNodes(ListNodesRequest())
        return sum(node.status == NodeStatus.ONLINE for node in answer.nodes_info)

    def _connect(self) -> Any:
        import contextlib
        import io

        from flwr.cli.flower_config import read_superlink_connection
        from flwr.cli.utils import init_http_client_from_connection

        saved = os.environ.get("FLWR_HOME")
        os.environ["FLWR_HOME"] = self.flwr_home  # where Flower's CLI code reads its connections
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # its "Using SuperLink: ..." line
                return init_http_client_from_connection(read_superlink_connection(self.connection))
        finally:
            if saved is None:
                os.environ.pop("FLWR_HOME", None)
            else:
                os.environ["FLWR_HOME"] = saved

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
