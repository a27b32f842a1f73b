"""Another user's client of a node's Runtime API: acquire a task, pull its input. Prints one JSON line."""

import json
import sys

from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore.constant import TaskType
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
from flwr.supercore.runtime import RuntimeHttpClient

results = {}
for port in sys.argv[1:]:
    client = RuntimeHttpClient.from_server_address(
        server_address=f"127.0.0.1:{port}", insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
    )
    try:
        response = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP],
                                                         agentapp_fab_hashes=[]))
        results[port] = "acquired a task" if response.HasField("task") else "answered: no task"
    except Exception as err:  # noqa: BLE001 - what the refusal looks like is the result
        results[port] = f"refused: {err}"
    finally:
        client.close()
print(json.dumps(results))
