"""What a run leaves in its run directory: metrics.csv, report.json, model.npz.

Written by the ServerApp as rounds finish, so an interrupted run still leaves
the rounds it completed. Reads only NumPy and Flower records, never torch.
"""

from __future__ import annotations

import io
import os
import platform
import time
from dataclasses import asdict
from importlib import metadata
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message
from flwr.common import log

from fedgpu.flower.client_app import WARNINGS_RECORD
from fedgpu.flower.failures import Failure, count_by_kind, no_reply
from fedgpu.monitor.events import emit
from fedgpu.names import FEDGPU_RECORD
from fedgpu.output import OutputError, append_line, csv_line, write_atomic, write_json

METRICS_COLUMNS = (
    "round",
    "server_loss",
    "server_accuracy",
    "train_loss",
    "results",
    "failures",
    "eval_results",
    "eval_failures",
    "round_seconds",
    "failure_reasons",  # train failures by kind: "raised ValueError x1; killed by SIGSEGV x1"
    "eval_failure_reasons",
)


def failure_fields(failure: Failure) -> dict[str, Any]:
    """A failed message's entry in report.json: the line to read, and the fields to count by."""
    return {"error": failure.text(), **{k: v for k, v in asdict(failure).items() if v not in ("", None)}}


def _by_kind(failed: list[dict[str, Any]]) -> str:
    return count_by_kind(entry.get("kind") or "unknown" for entry in failed)


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


class RunRecorder:
    def __init__(self, run_dir: str | os.PathLike, config: dict[str, Any], *, run_id: int | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.num_rounds = int(config.get("num-rounds", 0))
        self.report: dict[str, Any] = {
            "status": "running",
            "run_id": run_id,
            "config": config,
            "versions": {
                name: _version(name) for name in ("fedgpu", "flwr", "torch", "torchvision", "flwr-datasets", "numpy")
            }
            | {"python": platform.python_version()},
            "initial": None,
            "rounds": [],
        }
        self._round: dict[str, Any] | None = None
        self._round_started = 0.0
        self._warned = False
        self._metrics_path = self.run_dir / "metrics.csv"
        write_atomic(self._metrics_path, csv_line(METRICS_COLUMNS))
        self._write_report()

    def resolve_defaults(self, task_defaults: dict[str, Any]) -> None:
        """Report the values a run uses where its config says 0 ("the task's default"), and which those are."""
        resolved = [key for key, value in task_defaults.items() if key in self.config and not self.config[key]]
        self.config.update({key: task_defaults[key] for key in resolved})
        self.report["config_from_task_defaults"] = resolved
        self._write_report()

    def round_started(self, server_round: int) -> None:
        self._round_started = time.monotonic()
        emit("round-start", str(self.run_dir), round=server_round)
        # "failed_messages": each failed reply with its reason ("failures" is their count, as in metrics.csv).
        self._round = {"round": server_round, "messages": [], "failed_messages": []}

    def sent(self, server_round: int, kind: str, count: int) -> None:
        assert self._round is not None and self._round["round"] == server_round
        self._round.setdefault("sent", {})[kind] = count

    def replies(self, server_round: int, kind: str, replies: list[Message]) -> None:
        assert self._round is not None and self._round["round"] == server_round
        # A message that got no reply at all (its node vanished, the round timed out) is a failure too.
        missing = self._round.get("sent", {}).get(kind, 0) - len(replies)
        timeout = self.config.get("message-timeout", "the message timeout")
        for _ in range(max(0, missing)):
            failure = no_reply(timeout).where(round=server_round)
            self._round["failed_messages"].append({"type": kind, "node_id": None, **failure_fields(failure)})
        noted: list[str] = []
        for reply in replies:
            entry: dict[str, Any] = {"type": kind, "node_id": reply.metadata.src_node_id}
            if not reply.has_error() and WARNINGS_RECORD in reply.content.config_records:
                stamp = reply.content.config_records.get(FEDGPU_RECORD)
                who = f"client {stamp['client']}: " if stamp is not None and "client" in stamp else ""
                noted += [f"{who}{text}" for text in reply.content[WARNINGS_RECORD].values()]
            if reply.has_error():
                failure = Failure.from_error(reply.error).where(round=server_round)
                self._round["failed_messages"].append({**entry, **failure_fields(failure)})
                continue
            for record_name in reply.content.metric_records:
                entry.update(dict(reply.content[record_name]))
            if FEDGPU_RECORD in reply.content:
                entry.update(dict(reply.content[FEDGPU_RECORD]))
            self._round["messages"].append(entry)
        if noted and not self._warned:
            # Once per run: the same warning from every client would drown the rounds.
            self._warned = True
            more = f" (and {len(noted) - 1} more alike)" if len(noted) > 1 else ""
            log(WARNING, "[fedgpu] warning: %s%s", noted[0], more)
            self.report.setdefault("warnings", []).extend(noted)

    def server_evaluated(self, server_round: int, metrics: dict[str, Any], seconds: float) -> None:
        figures = {"loss": float(metrics["loss"]), "accuracy": float(metrics["accuracy"]), "seconds": seconds}
        if server_round == 0:
            self.report["initial"] = figures
            log(INFO, "[fedgpu] initial model: accuracy %.4f, loss %.4f", figures["accuracy"], figures["loss"])
            self._write_report()
            return
        assert self._round is not None and self._round["round"] == server_round
        row = self._finish_round(figures)
        emit("round-end", str(self.run_dir), round=server_round)
        append_line(self._metrics_path, csv_line([row[column] for column in METRICS_COLUMNS]))
        self._write_report()
        log(
            INFO,
            "[fedgpu] round %d/%d: server accuracy %.4f, loss %.4f | train loss %s | %d results, %d failures | %.1f s",
            server_round,
            self.num_rounds,
            row["server_accuracy"],
            row["server_loss"],
            "-" if row["train_loss"] == "" else f"{row['train_loss']:.4f}",
            row["results"],
            row["failures"],
            row["round_seconds"],
        )

    def _finish_round(self, server: dict[str, Any]) -> dict[str, Any]:
        current = self._round
        assert current is not None
        train = [m for m in current["messages"] if m["type"] == "train"]
        losses = [m["train-loss"] for m in train if "train-loss" in m]
        row = {
            "round": current["round"],
            "server_loss": server["loss"],
            "server_accuracy": server["accuracy"],
            "train_loss": float(np.mean(losses)) if losses else "",
            "results": len(train),
            "failures": sum(f["type"] == "train" for f in current["failed_messages"]),
            "eval_results": len(current["messages"]) - len(train),
            "eval_failures": sum(f["type"] == "evaluate" for f in current["failed_messages"]),
            "round_seconds": round(time.monotonic() - self._round_started, 3),
            "failure_reasons": _by_kind([f for f in current["failed_messages"] if f["type"] == "train"]),
            "eval_failure_reasons": _by_kind([f for f in current["failed_messages"] if f["type"] == "evaluate"]),
        }
        current.update(row, server_evaluation_seconds=server["seconds"])
        self.report["rounds"].append(current)
        self._round = None
        return row

    def finish(self, arrays: ArrayRecord | None) -> None:
        if arrays is not None:
            model = io.BytesIO()
            np.savez(model, **{name: a.numpy() for name, a in arrays.items()})
            write_atomic(self.run_dir / "model.npz", model.getvalue())
        self.report["status"] = "completed"
        self._write_report()

    def fail(self, kind: str, detail: str, **more: Any) -> None:
        """The run failed: say why in report.json, if it can still be written."""
        self.report["status"] = "failed"
        self.report["failure"] = {"kind": kind, "detail": detail, **more}
        try:
            self._write_report()
        except OutputError:
            pass  # the disk that failed the run cannot take the report either: the console says why

    def _write_report(self) -> None:
        write_json(self.run_dir / "report.json", self.report, default=str)


def failure_summary(report: dict[str, Any], run_dir: Path, most_places: int = 4) -> list[str]:
    """End-of-run lines: failures by kind, where they happened, and which logs to read."""
    rounds = report.get("rounds", [])
    failed = [(entry["round"], failure) for entry in rounds for failure in entry.get("failed_messages", [])]
    sent = sum(sum((entry.get("sent") or {}).values()) for entry in rounds)
    # Rounds as Flower numbers them: messages an app sends outside them (round 0 of a legacy workflow's
    # initial parameters, an own loop that names no round) are counted, but are no round.
    numbered = {entry["round"] for entry in rounds if _is_round(entry.get("round"))}
    logs = f"logs in {run_dir}: server.log, serverapp.log (the ServerApp), superlink.log, client-<i>.log (node i)"
    if not (Path(run_dir) / "superlink.log").exists():  # a simulation: one host process, no SuperLink, no nodes
        logs = f"logs in {run_dir}: server.log, serverapp.log (the ServerApp and the virtual clients), zygote.log"
    in_rounds = f" in {len(numbered)} rounds" if numbered else ""
    if not failed:
        return [f"[fedgpu] failures: none of {sent} messages{in_rounds}", f"[fedgpu] {logs}"]
    failed_rounds = {r for r, _ in failed if _is_round(r)}
    where = f", in {len(failed_rounds)} of {len(numbered)} rounds" if numbered else ""
    lines = [f"[fedgpu] failures: {len(failed)} of {sent} messages{where}"]
    kinds: dict[str, list[str]] = {}

    def order(item: tuple[Any, dict[str, Any]]) -> tuple[int, str, int, str]:
        client = str(item[1].get("client", ""))
        number = item[0] if _is_round(item[0]) or item[0] == 0 else 1 << 30  # outside the rounds: last
        return number, str(item[1].get("type", "")), int(client) if client.isdigit() else -1, client

    for server_round, failure in sorted(failed, key=order):
        place = f"round {server_round} {failure.get('type', '')}" if _is_round(server_round) else \
            f"{'before round 1' if server_round == 0 else 'outside the rounds'} {failure.get('type', '')}"
        client = failure.get("client")
        if client not in (None, ""):
            log_file = run_dir / f"client-{client}.log"
            place += f" client {client}" + (f" ({log_file})" if log_file.exists() else "")
        kinds.setdefault(failure.get("kind") or "unknown", []).append(place)
    for kind, places in kinds.items():
        more = f"; +{len(places) - most_places} more" if len(places) > most_places else ""
        lines.append(f"[fedgpu]   {kind} x{len(places)}: {'; '.join(places[:most_places])}{more}")
    lines.append(f"[fedgpu] {logs}")
    return lines


def _is_round(number: Any) -> bool:
    return isinstance(number, int) and not isinstance(number, bool) and number >= 1
