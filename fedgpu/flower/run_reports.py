"""What ``fedgpu server`` writes once a run has ended, whatever ended it: report.json's verdict and the memory reports.

The ServerApp writes report.json as the run goes (fedgpu's tasks) or not at
all (a user's app); only the server knows a signal that stopped the run, a
timeout, or that every message failed, so it completes the report here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedgpu.flower.server_plan import ServerPlan
from fedgpu.names import (
    RUN_FAILED_MARK,
)
from fedgpu.output import OutputError


def record_runtime(plan: ServerPlan) -> None:
    """report.json says which runtime ran: Flower's deployment runtime on a SuperLink, or a simulation."""
    from fedgpu.monitor.host import merge_into_report

    if not (plan.run_dir / "report.json").exists():
        return
    simulation = plan.simulation
    runtime: dict[str, Any] = {"mode": "deployment"}
    if simulation is not None:
        runtime = {"mode": "simulation", "virtual_nodes": simulation.nodes, "workers": simulation.workers,
                   "isolation": simulation.isolation}
    try:
        merge_into_report(str(plan.run_dir / "report.json"), "runtime", runtime)
    except (OSError, ValueError, OutputError):
        pass  # the report's own writer said what failed


def message_counts(report: dict[str, Any]) -> tuple[int, int]:
    """(messages sent, messages failed) over every round of report.json."""
    rounds = [entry for entry in report.get("rounds", []) if isinstance(entry, dict)]
    sent = sum(sum(count for count in (entry.get("sent") or {}).values() if isinstance(count, int)) for entry in rounds)
    return sent, sum(len(entry.get("failed_messages") or []) for entry in rounds)


def mark_ended(run_dir: Path, say: Callable[..., None], *, stopped_by: str = "", reason: str = "",
                kind: str = "run failed", exit_code: int | None = None) -> None:
    """report.json of a run that this process ended: by a signal, or for ``reason``.

    A task's ServerApp saw only its own end ("stopped by KeyboardInterrupt"),
    or nothing at all ("running"): the signal's name, or the reason, is known
    here. With ``exit_code``, a run Flower calls completed failed all the same
    (every message failed).
    """
    from fedgpu.output import write_json

    report = read_report(run_dir)
    if not report:
        return
    if stopped_by:
        if isinstance(report.get("failure"), dict) and report["failure"].get("kind") == "stopped":
            del report["failure"]
        report.update(status="stopped", stopped_by=stopped_by)
    elif report.get("status") == "running" or exit_code is not None:
        failure: dict[str, Any] = {"kind": kind, "detail": reason}
        if exit_code is not None:
            failure["exit_code"] = exit_code
        report.update(status="failed", failure=failure)
    else:
        return
    try:
        write_json(run_dir / "report.json", report, default=str)
    except OutputError as err:
        say(f"{RUN_FAILED_MARK}{err}")


def write_app_report(plan: ServerPlan, status: str, say: Callable[..., None], *, reason: str = "",
                      failure_kind: str = "run failed", stopped_by: str = "") -> None:
    """report.json of a user's app: Flower's status, why it failed or what stopped it, what became of every message."""
    from fedgpu.flower.app_report import app_report
    from fedgpu.flower.config import parse_config_pairs
    from fedgpu.output import write_json

    overrides: dict[str, Any] = {}
    for text in plan.run_config:
        overrides.update(parse_config_pairs(text))  # checked by plan_server already
    report = app_report(str(plan.run_dir), status, plan.app, overrides)
    if stopped_by:
        report["stopped_by"] = stopped_by
    elif report["status"] != "completed":
        report["status"] = "failed"  # "unknown" too: the run never finished
        # What the ServerApp's own process recorded (a reply its strategy could not aggregate) says more than
        # its last line; what ended the run from here (a timeout, too few nodes) is said as it is.
        if failure_kind != "ServerApp failed" or not isinstance(report.get("failure"), dict):
            report["failure"] = {"kind": failure_kind, "detail": reason or f"Flower's status: {status}"}
    try:
        write_json(plan.run_dir / "report.json", report, default=str)
    except OutputError as err:
        say(f"{RUN_FAILED_MARK}{err}")


def read_report(run_dir: Path) -> dict[str, Any]:
    try:
        report = json.loads((run_dir / "report.json").read_text())
    except (OSError, ValueError):
        return {}  # the ServerApp never wrote one: the error above says why
    return report if isinstance(report, dict) else {}


def write_memory_reports(run_dir: Path, monitor: Any, say: Callable[..., None]) -> None:
    """memory.json, memory.png and report.json's host_memory; the per-round table on stdout."""
    from fedgpu.monitor.host import merge_into_report
    from fedgpu.monitor.plot import write_plot
    from fedgpu.monitor.report import one_run
    from fedgpu.monitor.summary import Timeline, write_summary

    if monitor.error is not None:
        raise monitor.error
    memory = monitor.host.summary()
    merge_into_report(str(run_dir / "report.json"), "host_memory", memory)
    timeline = Timeline.load(str(run_dir))  # read once: the timeline can be tens of MB
    summary = write_summary(str(run_dir), timeline)
    write_plot(str(run_dir), summary, timeline)
    say(one_run(str(run_dir), summary))  # on the console, after the rounds
    say(
        f"[fedgpu] peak memory of the run's processes: {memory['peak_total_pss_mib']:.0f} MiB PSS "
        f"({memory['peak_total_rss_mib']:.0f} MiB summed RSS); see memory.json, memory.png",
        err=True,
    )
