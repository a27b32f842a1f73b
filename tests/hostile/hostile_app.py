"""What another user would run inside the owner's run: it leaves a marker file, as whoever runs it."""

import os
from pathlib import Path

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server = ServerApp()
client = ClientApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    Path(str(context.run_config["marker"])).write_text(f"ServerApp ran as uid {os.geteuid()}\n")
