"""Flower's CLIs run in this process, with fedgpu's changes in place first (flwr 1.42).

Each entry sets ``sys.argv`` as Flower's console script would (Flower's exit
handling and messages know a process by that name) and calls Flower's own
``main``:

* :func:`superlink_main` (``python -m fedgpu.flower.internals superlink``):
  Flower's SuperLink, guarded, on a port bound first, dying with the process
  named by ``--parent-pid``; its SuperExec finds :func:`serverapp_main` as
  ``flwr-serverapp`` first on PATH;
* :func:`serverapp_main`: ``flwr-serverapp`` with its rounds recorded, its
  grid paced and a wait for nodes that never come ended;
* :func:`run_supernode`: ``flower-supernode`` inside a fedgpu client node.

(``flwr run`` is not run here: ``control.Control.run_app`` does what it does, from the server's process.)
"""

from __future__ import annotations

import importlib
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path

from fedgpu.flower.internals.guard import FLEET_PATHS, BoundUvicorn, bind_listener, guard_app_factory
from fedgpu.flower.internals.node_waits import watch_node_waits
from fedgpu.flower.internals.pace import pace_grid
from fedgpu.flower.internals.round_hooks import record_app_rounds
from fedgpu.names import DOORBELLS_ENV, PACE_ENV

EXIT_PORT_TAKEN = 2  # the SuperLink could not bind its port: another run (or program) has it
PARENT_PID_OPTION = "--parent-pid"  # fedgpu's own option of the superlink entry; Flower never sees it


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



def private_bin_dir() -> str:
    """Where the ServerApp wrapper goes: the run's private directory (made here when run alone)."""
    from fedgpu.names import PRIVATE_DIR_ENV
    from fedgpu.private_dirs import make_private_dir, subdir

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

    from flwr.superlink import main as superlink_app

    from fedgpu.names import RUN_TOKEN_ENV

    host, port = _option(argv, "--host", "0.0.0.0"), int(_option(argv, "--port", "8000"))
    try:
        sock = bind_listener(host, port)
    except OSError as err:
        print(f"[fedgpu] error: port {port} on {host} is in use ({err.strerror or err})", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_PORT_TAKEN) from None
    guard_app_factory(superlink_app, remote_paths=FLEET_PATHS, token=os.environ.get(RUN_TOKEN_ENV))
    # The module, not the function of the same name that flwr.superlink.cli exports.
    superlink_cli = importlib.import_module("flwr.superlink.cli.flower_superlink")
    superlink_cli.uvicorn = BoundUvicorn(sock)  # type: ignore[attr-defined]
    bin_dir = private_bin_dir()
    wrapper = Path(bin_dir, "flwr-serverapp")
    # A Python script, so that the process reads "flwr-serverapp" as Flower's own does.
    wrapper.write_text(f"#!{sys.executable}\nimport sys\nfrom fedgpu.flower.internals.processes import serverapp_main\n"
                       "serverapp_main(sys.argv[1:])\n")
    wrapper.chmod(0o700)
    os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    sys.argv = ["flower-superlink", *argv]
    superlink_cli.flower_superlink()


def take_parent_pid(argv: list[str]) -> tuple[int | None, list[str]]:
    """(the pid of ``--parent-pid PID``, or None; the other arguments, for Flower)."""
    rest = list(argv)
    for i, arg in enumerate(rest):
        if arg == PARENT_PID_OPTION and i + 1 < len(rest):
            value = rest[i + 1]
            del rest[i : i + 2]
            return int(value), rest
        if arg.startswith(PARENT_PID_OPTION + "="):
            del rest[i]
            return int(arg.split("=", 1)[1]), rest
    return None, rest


def superlink_entry(argv: list[str]) -> None:
    """``superlink [--parent-pid PID] FLOWER_ARGS``: gone with its parent, like every fedgpu process."""
    from fedgpu.isolation.procs import watch_parent

    parent_pid, flower_argv = take_parent_pid(argv)
    watch_parent(parent_pid)  # set in the process itself: no preexec_fn, which is unsafe once threads run
    superlink_main(flower_argv)


def run_supernode(argv: list[str], runtime_listener: socket.socket | None = None) -> None:
    """Flower's SuperNode CLI (``argv`` starts with its program name) in this process, until it exits.

    ``runtime_listener``: the socket its Runtime API serves on, bound beforehand (``argv``'s ``--port`` is its port).
    """
    supernode_cli = importlib.import_module("flwr.supernode.cli.flower_supernode")  # the module, not its function
    if runtime_listener is not None:
        supernode_cli.uvicorn = BoundUvicorn(runtime_listener)  # type: ignore[attr-defined]
    sys.argv = list(argv)
    supernode_cli.flower_supernode()


def on_flower_exit(handler: Callable[[], None]) -> None:
    """Call ``handler`` on Flower's own SIGTERM/SIGINT exit path in this process."""
    from flwr.supercore.exit import add_exit_handler

    add_exit_handler(handler)

