"""The task runner: SuperExec and ClientApp runtime for one SuperNode.

It acquires each ClientApp task from its SuperNode's Runtime API (as
``flower-superexec`` would), pulls the message, context and FAB (as
``flwr-clientapp`` would), and sends the ClientApp call itself, message in and
reply out, to a short-lived child through the isolation core. The runner's
process never loads the ClientApp, so it never imports torch or touches CUDA.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from logging import ERROR, INFO, WARNING
from typing import Any

from flwr.app import ConfigRecord, Context, Message
from flwr.common import log

from fedgpu.flower.app_rounds import BAD_REPLY, server_round_of
from fedgpu.flower.children import placer_for, run_child
from fedgpu.flower.failures import Failure
from fedgpu.flower.internals.apps import client_app_from_fab, install_fab, load_client_app
from fedgpu.flower.internals.identity import TaskIds, adopt_task_identity, task_identity
from fedgpu.flower.internals.runtime_client import (
    TASK_COMPLETED,
    TASK_FAILED,
    client_app_task_request,
    pull_task_input,
    push_message,
    push_task_output,
    runtime_client,
    start_heartbeat,
)
from fedgpu.isolation import IsolationError, Isolator, Outcome
from fedgpu.monitor.events import emit
from fedgpu.names import FEDGPU_RECORD
from fedgpu.nvml.devices import MIB
from fedgpu.nvml.placement import GpuPlacer, Placement

# Key of the ConfigRecord the runner adds to every reply: how it was isolated.
# A failure reply must still reach the server before it stops waiting for the message:
# a tenth of the time, at least enough to stop the child (TERM, grace, KILL) and push.
REPLY_MARGIN_SECONDS = (5.0, 30.0)
# The deadline of a message of a run that names no message timeout (a user's app) where the node's --timeout
# does not say: the TTL such a message has is Flower's default of 12 hours, and a hung ClientApp would hold its
# node (and a GPU) that long. The same as a task run's --message-timeout.
APP_MESSAGE_SECONDS = 600.0


def message_deadline(message: Message, context: Context, timeout: float | None) -> float:
    """Seconds the message's child may run: always bounded.

    What the server waits for a reply (the run's ``message-timeout`` where the
    run says, else what is left of the message's TTL), less a margin for the
    failure reply to get back in time, and at most the node's ``--timeout``
    (where the run names no message timeout and the node no ``--timeout``,
    at most ``APP_MESSAGE_SECONDS``). Whole seconds: a deadline is reported,
    and counted, as a number.
    """
    waits = context.run_config.get("message-timeout")
    if not isinstance(waits, (int, float)) or isinstance(waits, bool) or waits <= 0:
        waits = message.metadata.created_at + message.metadata.ttl - time.time()
        timeout = APP_MESSAGE_SECONDS if timeout is None else timeout
    low, high = REPLY_MARGIN_SECONDS
    deadline = float(math.floor(waits - min(high, max(low, 0.1 * waits))))
    if timeout is not None:
        deadline = min(deadline, timeout)
    return max(1.0, deadline)


@dataclass(frozen=True)
class ClientAppCall:
    """Everything a child needs to run one ClientApp call, and nothing live."""

    fab_id: str
    fab_version: str
    fab_hash: str
    identity: TaskIds
    message: Message
    context: Context


def run_client_app(call: ClientAppCall) -> tuple[Message, Context]:
    """Load the run's ClientApp and run it on one message (inside the child)."""
    adopt_task_identity(call.identity)
    client_app = client_app_from_fab(call.fab_id, call.fab_version, call.fab_hash)
    reply = client_app(message=call.message, context=call.context)
    return reply, call.context


@dataclass(frozen=True)
class VirtualClientCall:
    """One message of a virtual node (``--simulation``): the app to load it from, the message and the node's Context."""

    client_app_ref: str  # module:attribute, as the app's pyproject.toml names it
    app_dir: str
    identity: TaskIds
    message: Message
    context: Context


def run_virtual_client(call: VirtualClientCall) -> tuple[Message, Context]:
    """Load the app's ClientApp and run it on one message (inside the child)."""
    adopt_task_identity(call.identity)
    client_app = load_client_app(call.client_app_ref, call.app_dir)
    reply = client_app(message=call.message, context=call.context)
    return reply, call.context


class TaskRunner:
    """Serves one SuperNode's ClientApp tasks, one at a time, each in a child."""

    def __init__(
        self,
        runtime_address: str,
        isolator: Isolator,
        *,
        timeout: float | None = None,
        poll_interval: tuple[float, float] = (0.1, 1.0),
        placer: GpuPlacer | None = None,
        task_stored: threading.Event | None = None,
        reply_stored: Callable[[], None] | None = None,
    ) -> None:
        self.runtime_address = runtime_address
        self.isolator = isolator
        self.timeout = timeout
        self.placer = placer  # None: children get no GPU of their own choosing (no GPU, or no isolation)
        # Fast right after a task (the next message of a round may follow),
        # backing off to Flower's own SuperExec interval when idle: a hundred
        # idle nodes polling five times a second would saturate a small host.
        self.poll_interval = poll_interval
        # With a paced SuperNode (fedgpu.flower.internals): it says when a task is there,
        # and is told when the reply is stored, instead of either side polling.
        self.task_stored = task_stored
        self.reply_stored = reply_stored
        self._stopping = threading.Event()

    def stop(self) -> None:
        """Stop polling and stop any child in flight (TERM, grace, KILL)."""
        self._stopping.set()
        if self.task_stored is not None:
            self.task_stored.set()
        self.isolator.shutdown()

    def serve_forever(self) -> None:
        client = self._client(component="SuperExec")
        request = client_app_task_request()
        fastest, slowest = self.poll_interval
        interval = slowest
        try:
            while not self._stopping.is_set():
                if self.task_stored is not None:
                    # Paced: the SuperNode's loop says when a message and all its content are
                    # stored (acquired earlier, the task's input would be pulled half there).
                    if not self.task_stored.wait(slowest):
                        continue
                    self.task_stored.clear()
                try:
                    response = client.AcquireTask(request)
                except Exception as err:  # noqa: BLE001 - the SuperNode may be starting or stopping
                    log(WARNING, "[fedgpu] Runtime API not reachable yet: %s", err)
                    self._stopping.wait(1.0)
                    continue
                if response.HasField("task") and response.token:
                    self._run_task(response.token)
                    interval = fastest
                elif self.task_stored is None:
                    self._stopping.wait(interval)
                    interval = min(slowest, interval * 2)
        finally:
            client.close()

    def _client(self, component: str, token: str | None = None) -> Any:
        return runtime_client(self.runtime_address, component, token)

    def _run_task(self, token: str) -> None:
        client = self._client(component="flwr-clientapp", token=token)
        heartbeat = start_heartbeat(client)
        message: Message | None = None
        context: Context | None = None
        reply: Message | None = None
        base = Failure("ClientApp task failed")
        failure: Failure | None = base
        stamp: dict[str, Any] = {}
        who: dict[str, Any] = {}
        try:
            message, context, run, fab = pull_task_input(client)
            who = who_of(message, context)
            base = failure = Failure("ClientApp task failed", client=str(who["client"]), round=who["round"])
            install_fab(fab.content)
            call = ClientAppCall(
                run.fab_id,
                run.fab_version,
                fab.hash_str,
                task_identity(),  # set by pull_task_input
                message,
                context,
            )
            placer = placer_for(self.placer, context.run_config.get("device", "auto"))
            deadline = message_deadline(message, context, self.timeout)
            log(INFO, "[fedgpu] %s message: running in a child (deadline %.0f s)", message.metadata.message_type,
                deadline)
            started = time.perf_counter()
            outcome, placement = run_child(
                self.isolator,
                placer,
                run_client_app,
                (call,),
                key=f"{context.run_config.get('task', '')}/{who['message']}",
                who=who,
                role="client-child",
                timeout=deadline,
            )
            call_seconds = time.perf_counter() - started  # child asked for -> reply back -> child reaped
            reply, context = outcome.value
            if isinstance(reply, Message):
                stamp = stamp_reply(reply, outcome, call_seconds, placement, who["client"])
                failure = None
                log(INFO, "[fedgpu] %s done in child %d (%.2f s)", message.metadata.message_type, outcome.pid,
                    outcome.seconds)
            else:  # the ClientApp's own doing: its message's failure, said as such
                failure = base.where(kind=BAD_REPLY,
                                     detail=f"the ClientApp answered {type(reply).__name__}, not a Message",
                                     pid=outcome.pid)
                log(ERROR, "[fedgpu] ClientApp failed: %s", failure.text())
        except IsolationError as err:
            failure = base.where(kind=err.kind, detail=err.detail, pid=err.pid)
            log(ERROR, "[fedgpu] ClientApp failed in its child: %s", err)
        except Exception as err:  # noqa: BLE001 - answer the server instead of dying
            failure = base.where(kind=f"{type(err).__name__} in the node",
                                 detail=str(err).splitlines()[0] if str(err) else "")
            log(ERROR, "[fedgpu] ClientApp task failed: %s", failure.text(), exc_info=err)
        finally:
            sub_status, details = TASK_COMPLETED, ""
            if failure is not None:
                sub_status, details = TASK_FAILED, failure.text()
                if message is not None:
                    reply = Message(failure.to_error(), reply_to=message)
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
                push_task_output(client, context, sub_status, details)
            except Exception as err:  # noqa: BLE001
                log(ERROR, "[fedgpu] could not push the reply: %s", err)
            if self.reply_stored is not None:
                self.reply_stored()
            # What this message cost and how it ended, for runs whose ServerApp is not ours.
            emit("message-end", pid=os.getpid(), node_id=context.node_id if context is not None else None, **who,
                 stamp=stamp, failure=None if failure is None else asdict(failure))
            heartbeat.stop()
            client.close()


def who_of(message: Message, context: Context) -> dict:
    """Client, round and message type of a task, as the memory monitor maps pids."""
    return {
        "client": context.node_config.get("partition-id", ""),
        "round": server_round_of(message),  # Flower's server round, whatever the workflow
        "message": message.metadata.message_type,
    }


def stamp_reply(reply: Message, outcome: Outcome, call_seconds: float, placement: Placement | None,
                client: object) -> dict[str, Any]:
    """Record where and how the reply was computed, for the server's report; the same as a dict."""
    if reply.has_error():
        return {}
    gpu = {}
    if placement is not None:
        gpu = {
            "gpu": placement.gpu,
            "gpu-reserved-mib": placement.reserved_bytes / MIB,
            "child-gpu-peak-mib": outcome.gpu_peak_bytes / MIB,
            "admission-wait-seconds": placement.waited_seconds,
        }
    stamp = {
        **gpu,
        "client": str(client),
        "isolation": outcome.mode,
        "child-pid": outcome.pid,
        "child-seconds": outcome.seconds,
        "call-seconds": call_seconds,
        "work-seconds": outcome.work_seconds,
        "child-max-rss-mib": outcome.max_rss_kib / 1024,
        "node-pid": os.getpid(),
        "node-torch-loaded": "torch" in sys.modules,
        "finished-at": time.time(),
    }
    reply.content[FEDGPU_RECORD] = ConfigRecord(stamp)
    return stamp
