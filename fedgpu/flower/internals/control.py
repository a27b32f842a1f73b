"""Asking a SuperLink's Control API from this process, as Flower's CLI does (flwr 1.42): nodes, runs, a run."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedgpu.names import FLWR_HOME_ENV


class Control:
    """A SuperLink's Control API, asked as ``flwr supernode list``, ``flwr ls`` and ``flwr run`` ask it.

    From this process, with one client for every question: the CLI costs about
    a second of CPU per call, taken from nodes that are starting on the same
    cores. ``flwr_home`` holds the connection (``[superlink.NAME]``) to ask.
    """

    def __init__(self, flwr_home: str | os.PathLike, connection: str) -> None:
        self.flwr_home, self.connection = str(flwr_home), connection
        self._client: Any = None
        self._superlink: Any = None  # the connection as read from flwr_home
        self._said = ""  # what Flower's CLI code printed while connecting ("Using SuperLink: ...")

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

    def run_app(self, app_dir: str | os.PathLike, run_config: list[str]) -> Iterator[str]:
        """What ``flwr run APP_DIR CONNECTION --stream --run-config ...`` prints, line by line, done from here.

        The app packaged as the CLI packages it (its FAB), submitted as a run
        with the run config overrides, then the run's log streamed until the
        run ends, as the CLI streams it. Raises what Flower raised (the
        SuperLink unreachable, the run refused); the lines before were given.
        """
        import hashlib

        from flwr.cli.build import build_fab_from_disk
        from flwr.cli.config_utils import load_and_validate
        from flwr.common.config import parse_config_args
        from flwr.common.serde import fab_to_proto, user_config_to_proto
        from flwr.proto.control_pb2 import StartRunRequest, StreamLogsRequest
        from flwr.supercore.fab import Fab

        app = Path(app_dir).resolve()
        # Without check_module: it would import the app's packages here (the launcher checked them in a child).
        _, warnings = load_and_validate(app / "pyproject.toml", check_module=False)
        if warnings:
            yield f"Flower App configuration warnings in '{app / 'pyproject.toml'}':\n"
            yield from (f"- {warning}\n" for warning in warnings)
        client = self._connected()
        yield from self._said.splitlines(keepends=True)
        fab_bytes = build_fab_from_disk(app)
        fab = Fab(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})
        answer = client.StartRun(StartRunRequest(
            fab=fab_to_proto(fab), override_config=user_config_to_proto(parse_config_args(run_config or None)),
            federation=self._superlink.federation or "",
        ))
        if answer.HasField("note"):
            yield f"Note: {answer.note}\n"
        if not answer.HasField("run_id"):
            raise RuntimeError("Failed to start run")
        yield f"Successfully started run {answer.run_id}\n"
        yield f"Starting logstream for run_id `{answer.run_id}`\n"
        partial = ""  # the log comes in chunks that need not end at a line's end
        for chunk in client.StreamLogs(StreamLogsRequest(run_id=answer.run_id, after_timestamp=0.0)):
            *lines, partial = (partial + chunk.log_output).split("\n")
            yield from (f"{line}\n" for line in lines)
        if partial:
            yield partial

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
        said = io.StringIO()
        try:
            with contextlib.redirect_stdout(said):  # its "Using SuperLink: ..." line: kept for run_app
                self._superlink = read_superlink_connection(self.connection)
                return init_http_client_from_connection(self._superlink)
        finally:
            self._said = said.getvalue()
            if saved is None:
                os.environ.pop(FLWR_HOME_ENV, None)
            else:
                os.environ[FLWR_HOME_ENV] = saved

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

