"""``report.json`` for a Flower app of the user's, whose ServerApp is not ours.

Our ServerApp records every reply itself; a user's does not. What every
message cost and how it ended is known where it ran: each client node writes
a ``message-end`` event for it (client, round, message type, the isolation
stamps, the failure if any). This module gathers them into the same report
shape fedgpu's own runs have, with Flower's final status.
"""

from __future__ import annotations

import platform
from collections import defaultdict
from importlib import metadata
from typing import Any

from fedgpu.monitor.events import read_events

MESSAGE_END = "message-end"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def status_of(flower_status: str) -> str:
    """fedgpu's status for Flower's: "finished:completed" -> "completed", "finished:failed" -> "failed"."""
    return flower_status.split(":", 1)[1] if flower_status.startswith("finished:") else flower_status


def app_report(run_dir: str, flower_status: str, app: dict[str, Any], run_config: dict[str, Any]) -> dict[str, Any]:
    """The report of an app run, from the nodes' events and Flower's status."""
    rounds: dict[Any, dict[str, Any]] = {}
    for event in read_events(run_dir):
        if event.get("event") != MESSAGE_END:
            continue
        number = event.get("round")
        entry = rounds.setdefault(number, {"round": number, "messages": [], "failed_messages": [], "sent": defaultdict(int)})
        kind = str(event.get("message", ""))
        entry["sent"][kind] += 1
        base = {"type": kind, "node_id": event.get("node_id"), "client": event.get("client")}
        failure = event.get("failure")
        if failure:
            entry["failed_messages"].append({**base, **failure})
        else:
            entry["messages"].append({**base, **(event.get("stamp") or {})})
    ordered = sorted(rounds.values(), key=lambda e: (e["round"] is None, e["round"] if isinstance(e["round"], int) else 0))
    for entry in ordered:
        entry["sent"] = dict(entry["sent"])
        entry["results"] = len(entry["messages"])
        entry["failures"] = len(entry["failed_messages"])
    return {
        "status": status_of(flower_status),
        "flower_status": flower_status,
        "app": app,
        "run_config": run_config,
        "versions": {name: _version(name) for name in ("fedgpu", "flwr", "torch", "numpy")} | {"python": platform.python_version()},
        "rounds": ordered,
    }
