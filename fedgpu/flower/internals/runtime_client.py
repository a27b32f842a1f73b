"""A SuperNode's Runtime API as its SuperExec and ``flwr-clientapp`` use it (flwr 1.42).

The task runner (``fedgpu.flower.runner``) is both for its node: it acquires
ClientApp tasks, pulls each task's message, context and FAB, and pushes the
reply and the task's outcome. Flower's runtime client, interceptors, retries
and heartbeat are used as Flower's own runtimes use them.
"""

from __future__ import annotations

from typing import Any

from flwr.common.constant import SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

__all__ = ["TASK_COMPLETED", "TASK_FAILED", "client_app_task_request", "pull_task_input", "push_message",
           "push_task_output", "runtime_client", "start_heartbeat"]

TASK_COMPLETED, TASK_FAILED = SubStatus.COMPLETED, SubStatus.FAILED  # a task's outcome, as pushed


def client_app_task_request() -> Any:
    """The request that acquires a ClientApp task, as ``flower-superexec`` asks for one."""
    return AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP], agentapp_fab_hashes=[])


def runtime_client(address: str, component: str, token: str | None = None) -> Any:
    """A client of the Runtime API at ``address`` (loopback: insecure), as ``component``; with a task's ``token``."""
    interceptors = [RuntimeVersionHttpInterceptor(component_name=component)]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,  # loopback, inside this process's own host
        root_certificates=None,
        interceptors=interceptors,
        retry_invoker=make_simple_http_retry_invoker(),
    )


def start_heartbeat(client: Any) -> Any:
    """The heartbeat of the task ``client`` holds, started; ``stop()`` ends it."""
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    return heartbeat
