"""``report.json`` for a Flower app of the user's, whose ServerApp is not ours.

Our ServerApp records every reply itself; a user's does not. What every
message cost and how it ended is known where it ran: each client node writes
a ``message-end`` event for it (client, round, message type, the isolation
stamps, the failure if any). The user's ServerApp, hooked by
``fedgpu.flower.app_rounds``, adds what only it knows: each round's metrics
and seconds (``round-end``), the replies its strategy could not aggregate
(``bad-reply``), why it failed (``serverapp-failed``). This module gathers
them into the same report shape fedgpu's own runs have, with Flower's final
status.
"""

from __future__ import annotations

import platform
from collections import defaultdict
from importlib import metadata
from typing import Any

from fedgpu.monitor.events import read_events

MESSAGE_END = "message-end"
WHAT = {
    "rounds": "Flower's server rounds. Each message is counted in the round its message names (config "
              "'server-round', or a legacy workflow's group_id)",
    "round_seconds": "the ServerApp's round as Flower counts it: from the round's start (Strategy.start begins it; "
                     "other workflows: its first message) to its last step (Strategy.start: its central evaluation; "
                     "DefaultWorkflow: its evaluate stage; else the next round's start or the ServerApp's return)",
    "metrics": "what the app's strategy aggregated: train_<key> from the train replies, evaluate_<key> from the "
               "evaluate replies, server_<key> from the central evaluation (a legacy workflow's History alike); "
               "as in metrics.csv",
}


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def status_of(flower_status: str) -> str:
    """fedgpu's status for Flower's: "finished:completed" -> "completed", "finished:failed" -> "failed"."""
    return flower_status.split(":", 1)[1] if flower_status.startswith("finished:") else flower_status


def app_report(run_dir: str, flower_status: str, app: dict[str, Any], run_config: dict[str, Any]) -> dict[str, Any]:
    """The report of an app run, from the nodes' and the ServerApp's events and Flower's status."""
    rounds: dict[Any, dict[str, Any]] = {}

    def entry_of(number: Any) -> dict[str, Any]:
        empty = {"round": number, "messages": [], "failed_messages": [], "sent": defaultdict(int)}
        return rounds.setdefault(number, empty)

    events = read_events(run_dir)
    for event in events:
        if event.get("event") != MESSAGE_END:
            continue
        entry = entry_of(event.get("round"))
        kind = str(event.get("message", ""))
        entry["sent"][kind] += 1
        base = {"type": kind, "node_id": event.get("node_id"), "client": event.get("client")}
        failure = event.get("failure")
        if failure:
            entry["failed_messages"].append({**base, **failure})
        else:
            entry["messages"].append({**base, **(event.get("stamp") or {})})
    report: dict[str, Any] = {}
    for event in events:  # the ServerApp's view (fedgpu.flower.app_rounds): metrics, seconds, rejected replies
        kind, number = event.get("event"), event.get("round")
        if kind == "round-end" and isinstance(number, int):
            entry = entry_of(number)
            entry["metrics"] = event.get("metrics") if isinstance(event.get("metrics"), dict) else {}
            entry["round_seconds"] = event.get("seconds")
        elif kind == "bad-reply" and isinstance(number, int):
            _reject(entry_of(number), event)
        elif kind == "app-initial" and isinstance(event.get("metrics"), dict):
            report["initial"] = event["metrics"]
        elif kind == "serverapp-failed" and "failure" not in report:
            report["failure"] = {key: event[key] for key in ("kind", "detail", "round") if event.get(key) is not None}
    ordered = sorted(rounds.values(),
                     key=lambda e: (e["round"] is None, e["round"] if isinstance(e["round"], int) else 0))
    for entry in ordered:
        entry["sent"] = dict(entry["sent"])
        entry["results"] = len(entry["messages"])
        entry["failures"] = len(entry["failed_messages"])
    return {
        "status": status_of(flower_status),
        "flower_status": flower_status,
        "app": app,
        "run_config": run_config,
        "versions": ({name: _version(name) for name in ("fedgpu", "flwr", "torch", "numpy")}
                     | {"python": platform.python_version()}),
        "what": WHAT,
        **report,
        "rounds": ordered,
    }


def _reject(entry: dict[str, Any], event: dict[str, Any]) -> None:
    """A reply the node computed but the app's strategy could not aggregate: a failure, with what is wrong."""
    kind, node_id = str(event.get("message", "")), event.get("node_id")
    for i, message in enumerate(entry["messages"]):
        if message.get("type") == kind and message.get("node_id") == node_id:
            del entry["messages"][i]
            break
    client = event.get("client") or ""
    failure = {"type": kind, "node_id": node_id, "client": client, "kind": event.get("kind"),
               "detail": event.get("detail"), "round": entry["round"]}
    who = f" (client {client})" if client else f" (node {node_id})"
    entry["failed_messages"].append({**failure, "error": f"{failure['kind']}: {failure['detail']}{who}"})
