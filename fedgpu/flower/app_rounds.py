"""What a user's ServerApp did, round by round: metrics.csv, a line per round, model.npz.

fedgpu's own ServerApp records its rounds itself (``recorder.py``); a user's
ServerApp is Flower's, unchanged. ``fedgpu.flower.internals`` hooks Flower in
the ServerApp's own process (every ServerApp of fedgpu's SuperLink starts
through ``serverapp_main``) and tells one :class:`AppRounds` what happens:

* every message the app pushes through its Grid and every reply it pulls,
  each counted in its server round (:func:`server_round_of`);
* what the strategy aggregated in each round (``Strategy.start``: the
  MetricRecords ``aggregate_train`` and ``aggregate_evaluate`` return, and
  ``evaluate_fn``'s central evaluation), or what a legacy workflow
  (``DefaultWorkflow``, SecAgg+) wrote into its ``History``;
* the arrays the strategy returns, saved as ``model.npz``.

A round is Flower's server round. It starts when Flower's ``Strategy.start``
begins it (other workflows: when its first message is pushed) and ends with
its last step: ``Strategy.start``'s central evaluation, a ``DefaultWorkflow``'s
evaluate stage; else when the next round starts or the strategy, workflow or
ServerApp returns. ``round_seconds`` is that span: node sampling, every
message of the round, aggregation and central evaluation. fedgpu's memory
rows use the same span (the ``round-start``/``round-end`` events).

metrics.csv has one row per round, as it ends: ``round``, then the app's own
metric keys prefixed by where they come from (``train_<key>``: aggregated
train replies; ``evaluate_<key>``: aggregated evaluate replies;
``server_<key>``: the central evaluation), then ``results``, ``failures``
(replies of every message type: an error reply or none at all is a failure),
``round_seconds`` and ``failure_reasons``. Columns appear as the app first
reports a key; the file is then rewritten with the wider header.

This module imports only Flower's public names and never torch.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message

from fedgpu.flower.checks import check_reply
from fedgpu.flower.failures import Failure, count_by_kind
from fedgpu.monitor.events import emit
from fedgpu.names import ROUND_LINE_MARK
from fedgpu.output import OutputError, append_line, csv_line, write_atomic

SOURCES = ("train", "evaluate", "server")  # the prefixes of the metric columns, in column order
FIRST_COLUMNS = ("round",)
LAST_COLUMNS = ("results", "failures", "round_seconds", "failure_reasons")
BAD_REPLY = "bad reply"


def server_round_of(message: Message) -> int | None:
    """Flower's server round of a message, None where it names none.

    Flower's strategies put it in the message's ``config`` record
    (``server-round``); the legacy workflows (``DefaultWorkflow``, SecAgg+)
    in its ``group_id`` (``str(current_round)``). Both are read: a message of
    any workflow lands in its round.
    """
    if message.has_content():
        config = message.content.config_records.get("config")
        number = config.get("server-round") if config is not None else None
        if isinstance(number, int) and not isinstance(number, bool):
            return number
    group = message.metadata.group_id
    return int(group) if isinstance(group, str) and group.isdigit() else None


def metric_columns(source: str, metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    """``{source}_{key}`` for each metric a strategy reported (lists and non-numbers left out)."""
    columns: dict[str, Any] = {}
    for key, value in (metrics or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            columns[f"{source}_{key}"] = value
    return columns


def _figure(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@dataclass
class _Round:
    number: int
    started: float  # time.monotonic()
    metrics: dict[str, Any] = field(default_factory=dict)
    results: int = 0
    failed: list[str] = field(default_factory=list)  # the kind of each failure
    waiting: set[str] = field(default_factory=set)  # ids of messages with no reply yet


class AppRounds:
    """Counts a ServerApp's messages per server round and writes a row as each round ends.

    ``say`` prints one console line (the ServerApp's stdout reaches the console
    through ``flwr run --stream``). Output errors end the recording, never the run.
    """

    def __init__(self, run_dir: str | os.PathLike, num_rounds: int | None = None,
                 say: Callable[[str], None] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.num_rounds = num_rounds
        self.say = say or (lambda line: print(line, flush=True))
        self.current: _Round | None = None
        self.last_round = 0
        self.rows: list[dict[str, Any]] = []
        self.initial: dict[str, Any] | None = None
        self.history: Any = None  # a legacy workflow's History, read as each round ends
        self.failure: dict[str, Any] | None = None
        self.in_strategy = False  # inside Strategy.start: a strategy started within it is not recorded again
        self._sent: dict[str, int] = {}  # message id -> its round
        self._columns: list[str] = []
        self._broken = False  # an output could not be written: record no more, say it once

    # -- rounds ------------------------------------------------------------------------

    def begin(self, number: int) -> None:
        """Round ``number`` starts (a no-op for the round already running, or one that ended)."""
        if number <= self.last_round or (self.current is not None and self.current.number >= number):
            return
        self.end()
        if self.initial is None:
            self._initial_from_history()
        self.current = _Round(number, time.monotonic())
        emit("round-start", str(self.run_dir), round=number)

    def end(self) -> None:
        """The running round (if any) ends: its row, its line, its round-end event."""
        current, self.current = self.current, None
        if current is None:
            return
        self.last_round = current.number
        current.failed += ["no reply"] * len(current.waiting)
        if self.history is not None:
            current.metrics.update(history_columns(self.history, current.number))
        seconds = round(time.monotonic() - current.started, 3)
        row = {"round": current.number, **current.metrics, "results": current.results,
               "failures": len(current.failed), "round_seconds": seconds,
               "failure_reasons": count_by_kind(current.failed)}
        self.rows.append(row)
        emit("round-end", str(self.run_dir), round=current.number, seconds=seconds,
             metrics=current.metrics, results=current.results, failures=len(current.failed))
        self._write_metrics(row)
        self.say(self.line(row))

    def line(self, row: Mapping[str, Any]) -> str:
        """``[fedgpu] round r/R: train … | evaluate … | server … | n results, m failures | s s``."""
        parts = []
        for source in SOURCES:
            figures = [f"{key[len(source) + 1:]} {_figure(value)}" for key, value in row.items()
                       if key.startswith(source + "_") and key not in LAST_COLUMNS]
            if figures:
                parts.append(f"{source} {', '.join(figures)}")
        failures = f"{row['failures']} failures" + (f" ({row['failure_reasons']})" if row["failure_reasons"] else "")
        parts += [f"{row['results']} results, {failures}", f"{row['round_seconds']:.1f} s"]
        total = self.num_rounds if self.num_rounds else "?"
        return f"{ROUND_LINE_MARK}round {row['round']}/{total}: {' | '.join(parts)}"

    # -- what the app sends and gets ---------------------------------------------------------

    def pushed(self, messages: Iterable[Message], ids: Iterable[str | None]) -> None:
        """Messages pushed (their ids as the Grid returned them, in order)."""
        for message, message_id in zip(messages, ids):
            number = server_round_of(message)
            if number is not None and number >= 1:
                self.begin(number)
            elif self.current is not None:
                number = self.current.number  # a message that names no round: the running one's
            if self.current is None or number != self.current.number:
                continue  # before round 1 (a legacy workflow's initial parameters), or a round already ended
            if message_id is None:
                self.current.failed.append("not pushed")
                continue
            self._sent[message_id] = number
            self.current.waiting.add(message_id)

    def pulled(self, replies: Iterable[Message]) -> None:
        for reply in replies:
            number = self._sent.pop(reply.metadata.reply_to_message_id, None)
            current = self.current
            if current is None or number != current.number:
                continue
            current.waiting.discard(reply.metadata.reply_to_message_id)
            if reply.has_error():
                current.failed.append(_error_kind(reply))
            else:
                current.results += 1

    def aggregated(self, number: int, source: str, metrics: Mapping[str, Any] | None) -> None:
        """What the strategy made of round ``number``'s replies (``source``: train, evaluate or server)."""
        columns = metric_columns(source, metrics)
        if number == 0 and source == "server":
            self._set_initial(columns)
        elif self.current is not None and self.current.number == number:
            self.current.metrics.update(columns)

    def rejected(self, number: int, kind: str, reply: Message, client: str, problem: str) -> None:
        """A reply the app's strategy could not aggregate: who sent it and what is wrong with it."""
        node_id = reply.metadata.src_node_id
        who = f"client {client} (node {node_id})" if client else f"node {node_id}"
        emit("bad-reply", str(self.run_dir), round=number, message=kind, node_id=node_id, client=client,
             kind=BAD_REPLY, detail=problem)
        self.say(f"{ROUND_LINE_MARK}round {number}: {BAD_REPLY} from {who} ({kind}): {problem}")
        if self.current is not None and self.current.number == number:
            self.current.failed.append(BAD_REPLY)
            self.current.results = max(0, self.current.results - 1)

    def failed(self, kind: str, detail: str) -> None:
        """The app's strategy failed the run: the first reason given is kept (report.json says it)."""
        if self.failure is not None:
            return
        self.failure = {"kind": kind, "detail": detail}
        if self.current is not None:
            self.failure["round"] = self.current.number
        emit("serverapp-failed", str(self.run_dir), **self.failure)

    def model(self, arrays: ArrayRecord | None) -> None:
        """The strategy's final arrays, as ``model.npz`` (one array per name)."""
        if arrays is None or len(arrays) == 0 or self._broken:
            return
        model = io.BytesIO()
        np.savez(model, **{str(name): array.numpy() for name, array in arrays.items()})
        try:
            write_atomic(self.run_dir / "model.npz", model.getvalue())
        except OutputError as err:
            self._output_failed(err)

    def close(self) -> None:
        self.end()

    # -- legacy workflows -----------------------------------------------------------------

    def _initial_from_history(self) -> None:
        if self.history is not None:
            columns = history_columns(self.history, 0)
            if columns:
                self._set_initial(columns)

    def _set_initial(self, columns: dict[str, Any]) -> None:
        if self.initial is not None or not columns:
            return
        self.initial = columns
        emit("app-initial", str(self.run_dir), metrics=columns)
        figures = ", ".join(f"{key[len('server_'):]} {_figure(value)}" for key, value in columns.items())
        self.say(f"{ROUND_LINE_MARK}initial model: server {figures}")

    # -- metrics.csv ------------------------------------------------------------------------

    def _write_metrics(self, row: dict[str, Any]) -> None:
        if self._broken:
            return
        metric_keys = [key for key in row if key not in FIRST_COLUMNS + LAST_COLUMNS]
        known = [key for key in self._columns if key not in FIRST_COLUMNS + LAST_COLUMNS]
        wider = [key for key in metric_keys if key not in known]
        path = self.run_dir / "metrics.csv"
        try:
            if wider or not self._columns:
                ordered = sorted(known + wider, key=lambda key: next(
                    (i for i, source in enumerate(SOURCES) if key.startswith(source + "_")), len(SOURCES)))
                self._columns = [*FIRST_COLUMNS, *ordered, *LAST_COLUMNS]
                lines = [csv_line(self._columns)]
                lines += [csv_line([r.get(c, "") for c in self._columns]) for r in self.rows]
                write_atomic(path, "".join(lines))
            else:
                append_line(path, csv_line([row.get(column, "") for column in self._columns]))
        except OutputError as err:
            self._output_failed(err)

    def _output_failed(self, err: OutputError) -> None:
        self._broken = True
        self.say(f"{ROUND_LINE_MARK}warning: {err}; no more rounds recorded")


def history_columns(history: Any, number: int) -> dict[str, Any]:
    """Round ``number`` of a legacy workflow's ``History`` as metric columns.

    ``metrics_distributed_fit`` -> train_*, ``losses_distributed`` and
    ``metrics_distributed`` -> evaluate_loss and evaluate_*,
    ``losses_centralized`` and ``metrics_centralized`` -> server_loss and server_*.
    """

    def at(pairs: Any) -> Any:
        values = [value for r, value in pairs or [] if r == number]
        return values[-1] if values else None

    columns: dict[str, Any] = {}
    groups = (("train", None, "metrics_distributed_fit"), ("evaluate", "losses_distributed", "metrics_distributed"),
              ("server", "losses_centralized", "metrics_centralized"))
    for source, losses, metrics in groups:
        values = {}
        if losses is not None and at(getattr(history, losses, None)) is not None:
            values["loss"] = at(getattr(history, losses))
        for key, pairs in (getattr(history, metrics, None) or {}).items():
            value = at(pairs)
            if value is not None:
                values[key] = value
        columns.update(metric_columns(source, values))
    return columns


def _error_kind(reply: Message) -> str:
    return Failure.from_error(reply.error).kind


def client_of(reply: Message) -> str:
    """The partition id fedgpu's nodes stamp on a reply they computed, "" for other replies."""
    from fedgpu.names import FEDGPU_RECORD  # the node's module: only where a reply is diagnosed

    stamp = reply.content.config_records.get(FEDGPU_RECORD) if reply.has_content() else None
    client = stamp.get("client") if stamp is not None else None
    return "" if client is None else str(client)


def diagnose_replies(
    replies: list[Message], model: ArrayRecord | None, weighted_by_key: str
) -> list[tuple[Message, str]]:
    """The replies that fedgpu's reply check finds wrong, each with what is wrong (``checks.check_reply``)."""
    bad = []
    for reply in replies:
        if reply.has_error():
            continue
        try:
            problem = check_reply(reply.content, model, weighted_by_key=weighted_by_key, max_size_factor=float("inf"))
        except Exception as err:  # noqa: BLE001 - a reply that cannot even be read is bad too
            problem = f"unreadable: {type(err).__name__}: {err}"
        if problem:
            bad.append((reply, problem))
    return bad
