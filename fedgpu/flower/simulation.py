"""``--simulation``: one process hosts the ServerApp and N virtual nodes; every message runs in a zygote child.

::

    fedgpu server --simulation-nodes N                (monitor, reports; never imports torch)
     └─ simulation host: python -m fedgpu.flower.simulation
         ├─ ServerApp thread ── InMemoryGrid ── in-memory LinkState (Flower's)
         ├─ dispatcher (told by the LinkState which node has a message; one per node at a time)
         └─ W worker threads ── ZygoteBackend.process_message(message, context)
                                  └─ zygote child: load the app's ClientApp, run it once,
                                     (reply, context) back through the socket, exit

Flower's Simulation Runtime keeps node registration, the Contexts
(``context.state`` survives from message to message because the child hands
its Context back), run config and ``node_config``; fedgpu's backend replaces
Ray's actors. A virtual node costs only its Context; a waiting message only
its place in the queue. A child that fails costs its message an ``Error``
reply, never the run. This process imports torch only if the app's ServerApp
does; fedgpu's own ServerApp does not.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from dataclasses import asdict
from logging import ERROR
from typing import Any

from flwr.app import Context, Message
from flwr.common import log

from fedgpu.flower.app_rounds import BAD_REPLY
from fedgpu.flower.children import placer_for, run_child
from fedgpu.flower.failures import Failure
from fedgpu.flower.internals.simulation import Backend, app_components, in_memory_grid_class, run_simulation_runtime
from fedgpu.flower.runner import VirtualClientCall, message_deadline, run_virtual_client, stamp_reply, who_of
from fedgpu.flower.transfer import task_identity
from fedgpu.isolation import ChildRaised, IsolationError, Isolator
from fedgpu.monitor.events import emit
from fedgpu.names import ZYGOTE_ENV
from fedgpu.nvml.placement import GpuPlacer

GRACE_SECONDS = 5.0  # a stopped run's children: TERM, then KILL after this


class ZygoteBackend(Backend):
    """Flower's Simulation Runtime backend: each message in a short-lived child; ``workers`` at once.

    Parameters
    ----------
    isolator : Isolator
        Starts the children (forked from the host's zygote).
    client_app_ref : str
        The app's ClientApp, ``module:attribute``; loaded in each child, never here.
    app_dir : str
        The app's directory (the run's private copy).
    workers : int
        Messages in flight at once.
    placer : GpuPlacer or None
        Puts each child on a GPU with room (None: no GPU, or the run picks its device).
    timeout : float or None
        Seconds a message's child may run at most (the message's own deadline is shorter where it says).
    node_config : dict
        More node config for every virtual node (``--node-config``).
    """

    def __init__(self, isolator: Isolator, client_app_ref: str, app_dir: str, workers: int, *,
                 placer: GpuPlacer | None = None, timeout: float | None = None,
                 node_config: dict[str, Any] | None = None) -> None:
        super().__init__({})
        self.isolator = isolator
        self.client_app_ref = client_app_ref
        self.app_dir = app_dir
        self.workers = workers
        self.placer = placer
        self.timeout = timeout
        self.node_config = dict(node_config or {})

    def build(self, app_fn: Any) -> None:
        """Nothing to build: the ClientApp is loaded in every child, from the app's directory."""

    @property
    def num_workers(self) -> int:
        return self.workers

    def is_worker_idle(self) -> bool:
        return True  # a message waits in Flower's queue, not here

    def terminate(self) -> None:
        self.isolator.shutdown(GRACE_SECONDS)

    def process_message(self, message: Message, context: Context) -> tuple[Message, Context]:
        """Run the ClientApp on ``message`` in a child; its reply (an ``Error`` if it failed) and the node's Context."""
        if self.node_config:
            context.node_config.update({k: v for k, v in self.node_config.items() if k not in context.node_config})
        who = who_of(message, context)
        failure = Failure("ClientApp task failed", client=str(who["client"]), round=who["round"])
        reply: Any = None
        stamp: dict[str, Any] = {}
        child_traceback = ""
        try:
            call = VirtualClientCall(self.client_app_ref, self.app_dir, task_identity(), message, context)
            started = time.perf_counter()
            outcome, placement = run_child(
                self.isolator,
                placer_for(self.placer, context.run_config.get("device", "auto")),
                run_virtual_client,
                (call,),
                key=f"{context.run_config.get('task', '')}/{who['message']}",
                who=who,
                role="client-child",
                timeout=message_deadline(message, context, self.timeout),
            )
            reply, updated = outcome.value
            if isinstance(reply, Message) and isinstance(updated, Context):
                context = updated
                stamp = stamp_reply(reply, outcome, time.perf_counter() - started, placement, who["client"])
                failed = None
            else:  # the ClientApp's own doing, as a reply its strategy could not use would be
                failed = failure.where(kind=BAD_REPLY,
                                       detail=f"the ClientApp answered {type(reply).__name__}, not a Message",
                                       pid=outcome.pid)
        except IsolationError as err:
            failed = failure.where(kind=err.kind, detail=err.detail, pid=err.pid)
            child_traceback = err.remote_traceback if isinstance(err, ChildRaised) else ""
        except Exception as err:  # noqa: BLE001 - one message's failure, answered as its Error reply
            first = str(err).splitlines()[0] if str(err) else ""
            failed = failure.where(kind=f"{type(err).__name__} in the simulation host", detail=first)
        if failed is not None:
            log(ERROR, "[fedgpu] ClientApp failed: %s", failed.text())
            if child_traceback:  # where it raised: a virtual client has no log of its own, serverapp.log has it
                log(ERROR, "ClientApp traceback (client %s, child pid %s):\n%s", who["client"], failed.pid,
                    child_traceback.rstrip())
            reply = Message(failed.to_error(), reply_to=message)
        emit("message-end", pid=os.getpid(), node_id=context.node_id, **who, stamp=stamp,
             failure=None if failed is None else asdict(failed))
        return reply, context


def main(argv: list[str] | None = None) -> int:
    """The simulation host: ``python -m fedgpu.flower.simulation APP_DIR --nodes N --workers W ...``."""
    from fedgpu.flower.config import parse_config_pairs
    from fedgpu.flower.internals import record_app_rounds, watch_node_waits
    from fedgpu.flower.warm_ups import app_warm_ups, zygote_warm_ups
    from fedgpu.isolation.procs import watch_parent
    from fedgpu.names import IN_ISOLATED_CHILD
    from fedgpu.nvml.placement import PlacementSettings

    parser = argparse.ArgumentParser(prog="fedgpu-simulation")
    parser.add_argument("app_dir")
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--isolation", default="zygote")
    parser.add_argument("--timeout", type=float, default=None)
    parser.add_argument("--node-config", default="")
    parser.add_argument("--run-config", action="append", default=[])
    parser.add_argument("--task", default="")
    parser.add_argument("--parent-pid", type=int, default=None)
    args = parser.parse_args(argv)
    watch_parent(args.parent_pid)

    def say(line: str) -> None:
        print(f"[fedgpu] {line}", file=sys.stderr, flush=True)

    record_app_rounds(log=say)
    watch_node_waits(log=say, grid_class=in_memory_grid_class())
    _, client_app_ref, _, _ = app_components(args.app_dir)
    client_module = client_app_ref.partition(":")[0]
    # Only for a private zygote (no $FEDGPU_ZYGOTE: `fedgpu server --simulation-nodes` alone). The app's module is
    # optional there: that zygote does not have the app on its path; each child imports it from the app's directory.
    warm_ups = zygote_warm_ups(args.task) if args.task else app_warm_ups(client_module, optional=True)
    isolator = Isolator(args.isolation, env={IN_ISOLATED_CHILD: "1"}, zygote=os.environ.get(ZYGOTE_ENV) or None,
                        warm_ups=warm_ups, reap_in_background=True)  # a child's exit is off the message's path
    # Children are placed on GPUs with room, where there are GPUs (the server exported the settings it checked).
    placer = GpuPlacer.from_settings(PlacementSettings.from_env(), log=say)
    overrides: dict[str, Any] = {}
    for text in args.run_config:
        overrides.update(parse_config_pairs(text))
    backend = ZygoteBackend(isolator, client_app_ref, args.app_dir, args.workers, placer=placer, timeout=args.timeout,
                            node_config=parse_config_pairs(args.node_config))

    def stop(signum: int, _frame: object) -> None:
        # The ServerApp thread cannot be interrupted: stop the children, then leave at once.
        for each in (signal.SIGINT, signal.SIGTERM):
            signal.signal(each, signal.SIG_IGN)
        say(f"{signal.Signals(signum).name} received: stopping the simulation")
        isolator.shutdown(GRACE_SECONDS)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(128 + signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
    emit("simulation-start", pid=os.getpid(), isolation=args.isolation, nodes=args.nodes, workers=args.workers)
    say(f"simulation: {args.nodes} virtual nodes, {args.workers} messages at once, each in a {args.isolation} child")
    try:
        run_simulation_runtime(args.app_dir, args.nodes, lambda _config: backend, run_config=overrides)
        return 0
    except BaseException as err:  # noqa: BLE001 - the ServerApp's failure: its traceback, then exit 1
        log(ERROR, "[fedgpu] the simulation ended with %s", type(err).__name__, exc_info=err)
        return 1
    finally:
        isolator.shutdown(GRACE_SECONDS)
        if placer is not None:
            placer.close()


if __name__ == "__main__":
    sys.stdout.flush()
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # The ServerApp thread is done; Flower's helper threads may linger (its dispatcher waits out its timeout).
    os._exit(code)
