"""A run submitted as `flwr run --stream` submits it, from the server's own process (no CLI process).

The SuperLink here is a port nothing listens on: Flower's own client code is refused by a real socket.
The runs that are submitted and streamed are every end-to-end test's.
"""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import pytest

from fedgpu.flower.internals import Control
from fedgpu.flower.server_plan import ServerPlan, ServerSettings
from fedgpu.flower.settings import RunSettings
from fedgpu.flower.superlink import CONNECTION, Federation, ServerError, write_app, write_connection
from fedgpu.names import FLWR_HOME_ENV

from helpers import free_port


def test_a_submission_nobody_answers_is_said_in_serverapp_log_and_fails_the_run_in_one_line(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    server = ServerSettings(port=port)
    write_connection(run_dir / "flwr-home", server)
    federation = Federation(ServerPlan(run_dir, server, run=RunSettings(run_dir=str(run_dir))),
                            env={FLWR_HOME_ENV: str(run_dir / "flwr-home")})
    console = io.StringIO()
    with pytest.raises(ServerError, match="^cannot read the run status from the SuperLink: ConnectError"):
        federation.submit_and_wait(console)
    said = (run_dir / "serverapp.log").read_text().splitlines()
    assert said[0] == f"Using SuperLink: {CONNECTION} (127.0.0.1:{port})", said
    assert said[-1] == "`flwr run` failed: ConnectError: [Errno 111] Connection refused", said
    assert not any("Successfully started run" in line for line in said), said
    assert [line.rstrip("\n") for line in federation.tail] == said  # what a failed run shows of its ServerApp
    assert console.getvalue() == ""  # fedgpu's own ServerApp: only its round lines reach the console


def test_run_app_says_the_connection_then_raises_what_flower_raised(tmp_path: Path) -> None:
    port = free_port()
    write_connection(tmp_path / "flwr-home", ServerSettings(port=port))
    write_app(tmp_path / "app", RunSettings())
    control = Control(tmp_path / "flwr-home", CONNECTION)
    lines = control.run_app(tmp_path / "app", ["num-rounds=2"])
    try:
        assert next(lines) == f"Using SuperLink: {CONNECTION} (127.0.0.1:{port})\n"
        with pytest.raises(httpx.ConnectError, match="Connection refused"):  # Flower's Control client is httpx's
            next(lines)
    finally:
        lines.close()
        control.close()
