"""What a run leaves in its run directory: metrics.csv, report.json, model.npz.

Written by the ServerApp as rounds finish, so an interrupted run still leaves
the rounds it completed. Reads only NumPy and Flower records, never torch.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import time
from importlib import metadata
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message
from flwr.supercore import log

from fedgpu.flower.runner import FEDGPU_RECORD
from fedgpu.monitor.events import emit

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
)


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
        self._metrics_path = self.run_dir / "metrics.csv"
        with self._metrics_path.open("w", newline="") as handle:
            csv.writer(handle).writerow(METRICS_COLUMNS)
        self._write_report()

    def round_started(self, server_round: int) -> None:
        self._round_started = time.monotonic()
        emit("round-start", str(self.run_dir), round=server_round)
        # "failed_messages": each failed reply with its reason ("failures" is their count, as in metrics.csv).
        self._round = {"round": server_round, "messages": [], "failed_messages": []}

    def replies(self, server_round: int, kind: str, replies: list[Message]) -> None:
        assert self._round is not None and self._round["round"] == server_round
        for reply in replies:
            entry: dict[str, Any] = {"type": kind, "node_id": reply.metadata.src_node_id}
            if reply.has_error():
                entry["error"] = reply.error.reason
                self._round["failed_messages"].append(entry)
                continue
            for record_name in reply.content.metric_records:
                entry.update(dict(reply.content[record_name]))
            if FEDGPU_RECORD in reply.content:
                entry.update(dict(reply.content[FEDGPU_RECORD]))
            self._round["messages"].append(entry)

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
        with self._metrics_path.open("a", newline="") as handle:
            csv.writer(handle).writerow([row[column] for column in METRICS_COLUMNS])
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
        }
        current.update(row, server_evaluation_seconds=server["seconds"])
        self.report["rounds"].append(current)
        self._round = None
        return row

    def finish(self, arrays: ArrayRecord | None, status: str = "completed") -> None:
        if arrays is not None:
            np.savez(self.run_dir / "model.npz", **{name: a.numpy() for name, a in arrays.items()})
        self.report["status"] = status
        self._write_report()

    def _write_report(self) -> None:
        path = self.run_dir / "report.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.report, indent=2, default=str))
        tmp.replace(path)
