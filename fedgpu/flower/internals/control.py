"""Asking a SuperLink's Control API from this process, as Flower's CLI does (flwr 1.42)."""

from __future__ import annotations

import os
from typing import Any

from fedgpu.names import FLWR_HOME_ENV


class Control:
    """A SuperLink's Control API, asked as ``flwr supernode list`` and ``flwr ls`` ask it.

    From this process, with one client for every question: the CLI costs about
    a second of CPU per call, taken from nodes that are starting on the same
    cores. ``flwr_home`` holds the connection (``[superlink.NAME]``) to ask.
    """

    def __init__(self, flwr_home: str | os.PathLike, connection: str) -> None:
        self.flwr_home, self.connection = str(flwr_home), connection
        self._client: Any = None

    def online(self) -> int:
        """Nodes registered and not yet deactivated: those a ServerApp's ``grid.get_node_ids()`` returns."""
        from flwr.proto.control_pb2 import ListNodesRequest
        from flwr.supercore.constant import NodeStatus

        answer = self._connected().ListNodes(ListNodesRequest())
        return sum(node.status == NodeStatus.ONLINE for node in answer.nodes_info)

    def run_statuses(self) -> list[str]:
        """Every run's status as ``flwr ls`` says it (``finished:completed``, ``running``, ...), in its order."""
        from flwr.proto.control_pb2 import ListRunsRequest

        answer = self._connected().ListRuns(ListRunsRequest())
        return [f"{run.status.status}:{run.status.sub_status}" if run.status.sub_status else run.status.status
                for run in answer.run_dict.values()]

    def _connected(self) -> Any:
        """The client, made on the first question and kept for the next."""
        if self._client is None:
            self._client = self._connect()
        return self._client

    def _connect(self) -> Any:
        import contextlib
        import io

        from flwr.cli.flower_config import read_superlink_connection
        from flwr.cli.utils import init_http_client_from_connection

        saved = os.environ.get(FLWR_HOME_ENV)
        os.environ[FLWR_HOME_ENV] = self.flwr_home  # where Flower's CLI code reads its connections
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # its "Using SuperLink: ..." line
                return init_http_client_from_connection(read_superlink_connection(self.connection))
        finally:
            if saved is None:
                os.environ.pop(FLWR_HOME_ENV, None)
            else:
                os.environ[FLWR_HOME_ENV] = saved

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

