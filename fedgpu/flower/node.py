"""A fedgpu client node: Flower's SuperNode plus a task runner, in one light process.

The SuperNode runs in this process in ``--isolation process`` mode, so it
launches nothing itself; the task runner thread is its SuperExec and ClientApp
runtime and sends each ClientApp call to a child. One process per node keeps an
idle node at the cost of Flower's SuperNode alone.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from logging import ERROR, INFO, WARNING

from flwr.common import log

from fedgpu.errors import BadInput
from fedgpu.flower.config import toml_value
from fedgpu.flower.internals import NodePace, bind_listener, guard_supernode_runtime, pace_supernode
from fedgpu.flower.internals.processes import on_flower_exit, run_supernode
from fedgpu.flower.runner import TaskRunner
from fedgpu.flower.warm_ups import zygote_warm_ups
from fedgpu.isolation import Isolator
from fedgpu.monitor.events import emit
from fedgpu.names import DOORBELLS_ENV, FLWR_HOME_ENV, IN_ISOLATED_CHILD
from fedgpu.net import unreachable, wait_for_health
from fedgpu.nvml.placement import GpuPlacer, PlacementSettings


@dataclass
class NodeSettings:
    superlink: str
    node_config: dict[str, object]
    isolation: str = "zygote"  # "none": the ClientApp runs in this process (baseline)
    zygote: str | None = None  # the host's shared zygote; None: $FEDGPU_ZYGOTE, else a private one
    timeout: float | None = None  # per message, in the child
    runtime_port: int | None = None
    max_wait_time: float | None = None  # give up on an unreachable SuperLink
    root_certificates: str | None = None  # TLS: the CA to check the SuperLink against; None: insecure
    auth_private_key: str | None = None  # SuperNode authentication


def format_node_config(config: dict[str, object]) -> str:
    """Flower's ``--node-config`` syntax: space-separated TOML key=value pairs."""
    return " ".join(f"{key}={toml_value(value)}" for key, value in config.items())


def supernode_argv(settings: NodeSettings, runtime_port: int) -> list[str]:
    argv = ["flower-supernode", "--superlink", settings.superlink]
    argv += ["--root-certificates", settings.root_certificates] if settings.root_certificates else ["--insecure"]
    if settings.auth_private_key:
        argv += ["--auth-supernode-private-key", settings.auth_private_key]
    argv += ["--isolation", "process", "--host", "127.0.0.1", "--port", str(runtime_port)]
    argv += ["--node-config", format_node_config(settings.node_config)]
    if settings.max_wait_time is not None:
        argv += ["--max-wait-time", str(settings.max_wait_time)]
    return argv


@dataclass(frozen=True)
class NodePlan:
    """A checked ``fedgpu client``."""

    settings: NodeSettings
    placement: PlacementSettings | None  # None: no children to place (the baseline)


def run_planned_node(plan: NodePlan) -> None:
    """Wait (bounded) for the SuperLink, then serve until the SuperNode exits."""
    settings = plan.settings
    patience = settings.max_wait_time or DEFAULT_PATIENCE_SECONDS
    deadline = time.monotonic() + patience
    while why := unreachable(settings.superlink):
        if time.monotonic() >= deadline:
            raise BadInput(f"cannot reach the SuperLink at {settings.superlink} within {patience:g} s: {why}")
        time.sleep(0.5)
    # A private Flower home: nodes on one host must not install FABs into the same directory at once.
    # In the run's private directory under `fedgpu run`; alone, in one of its own.
    from fedgpu.names import PRIVATE_DIR_ENV
    from fedgpu.private_dirs import make_private_dir, sweep_dead

    if os.environ.get(PRIVATE_DIR_ENV):
        flwr_home = tempfile.mkdtemp(prefix="node-", dir=os.environ[PRIVATE_DIR_ENV])
    else:
        sweep_dead()
        flwr_home = make_private_dir("node")
    os.environ[FLWR_HOME_ENV] = flwr_home
    placer = None
    if plan.placement is not None:  # only children are placed: without --mp the node itself would hold the GPU
        placer = GpuPlacer.from_settings(plan.placement,
                                         log=lambda line: print(f"[fedgpu] {line}", file=sys.stderr, flush=True))
    try:
        run_client_node(settings, placer)
    finally:
        shutil.rmtree(flwr_home, ignore_errors=True)


def run_client_node(settings: NodeSettings, placer: GpuPlacer | None = None) -> None:
    """Run until the SuperNode exits (signal, or the SuperLink gone for good).

    ``placer`` puts each message's child on a GPU with room for it (children only:
    without isolation the node itself would hold the GPU).
    """
    # Bound here, before Flower starts: a free port picked now and bound later by Flower could be handed to
    # another process in between (seen with four test files at work: the node died at start).
    listener = bind_listener("127.0.0.1", settings.runtime_port or 0)
    port = listener.getsockname()[1]
    # The ClientApp already runs in a child: @isolate inside it must not nest another.
    child_env = {IN_ISOLATED_CHILD: "1"} if settings.isolation != "none" else {}
    task = settings.node_config.get("task")
    isolator = Isolator(settings.isolation, env=child_env, zygote=settings.zygote,
                        warm_ups=zygote_warm_ups(*([str(task)] if task else [])))
    guard_supernode_runtime()  # only this uid's processes may acquire its tasks
    pace = NodePace(os.environ.get(DOORBELLS_ENV))
    paced = pace_supernode(pace, log=lambda line: log(WARNING, "[fedgpu] %s", line))
    runner = TaskRunner(f"127.0.0.1:{port}", isolator, timeout=settings.timeout, placer=placer,
                        task_stored=pace.task_stored if paced else None,
                        reply_stored=pace.reply_pushed if paced else None)
    emit("node-start", pid=os.getpid(), client=settings.node_config.get("partition-id", ""),
         isolation=settings.isolation)
    on_flower_exit(runner.stop)  # Flower's SIGTERM/SIGINT path stops our children too

    def serve() -> None:
        try:
            wait_for_health(f"http://127.0.0.1:{port}/health")
            log(INFO, "[fedgpu] task runner ready (isolation=%s, node pid %d)", settings.isolation, os.getpid())
            runner.serve_forever()
        except BaseException as err:  # noqa: BLE001 - a node that cannot serve must not linger
            log(ERROR, "[fedgpu] task runner stopped: %r; stopping the node", err, exc_info=err)
            os.kill(os.getpid(), signal.SIGTERM)

    # Children are started from this thread: it lives as long as the node, so
    # their parent-death signal fires only when the node is gone.
    threading.Thread(target=serve, name="fedgpu-task-runner", daemon=True).start()
    watch = SuperLinkWatch(settings.superlink, settings.max_wait_time or DEFAULT_PATIENCE_SECONDS)
    watch.start()
    try:
        run_supernode(supernode_argv(settings, port), runtime_listener=listener)
    finally:
        runner.stop()
        if paced:
            log(INFO, "[fedgpu] %s", pace.summary())
        pace.close()
        if watch.lost.is_set():
            raise SystemExit(EXIT_SUPERLINK_LOST)  # not Flower's graceful 0: this node did not finish its work


DEFAULT_PATIENCE_SECONDS = 60.0
EXIT_SUPERLINK_LOST = 3


class SuperLinkWatch(threading.Thread):
    """Stops the node when its SuperLink has been unreachable for ``patience`` seconds.

    Flower's SuperNode, once connected, retries a lost SuperLink forever; a
    node whose server is gone would otherwise linger (holding nothing on the
    GPU, but still a process nobody will stop on another host).
    """

    def __init__(self, address: str, patience: float, interval: float = 5.0) -> None:
        super().__init__(name="fedgpu-superlink-watch", daemon=True)
        self.address, self.patience, self.interval = address, patience, interval
        self.lost = threading.Event()

    def run(self) -> None:
        last_seen = time.monotonic()
        while True:
            why = unreachable(self.address)
            now = time.monotonic()
            if not why:
                last_seen = now
            elif now - last_seen >= self.patience:
                log(ERROR, "[fedgpu] the SuperLink at %s has been unreachable for %.0f s (%s): stopping this node "
                    "(exit %d)", self.address, now - last_seen, why, EXIT_SUPERLINK_LOST)
                self.lost.set()
                os.kill(os.getpid(), signal.SIGTERM)  # Flower's own shutdown path, which stops our children too
                return
            time.sleep(min(self.interval, max(0.5, self.patience / 4)))
