"""Check every reply before it is aggregated: one client's bad reply costs one message.

Flower's FedAvg and its relatives aggregate what the clients send as it is: a
wrongly shaped array ends the run (``non-broadcastable output operand``), one
array too many or too few too (``InconsistentMessageReplies``), and a NaN
poisons the global model quietly. ``CheckedStrategy`` wraps any Flower
strategy that runs Flower's own round loop and turns each bad reply into an
error reply before the wrapped strategy sees it, so the round aggregates the
rest and the bad one is counted as a failure with its reason:

    from flwr.serverapp.strategy import FedAvg
    from fedgpu.flower import CheckedStrategy

    strategy = CheckedStrategy(FedAvg(fraction_train=0.5))
    result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=3)

A train reply must carry one ArrayRecord with the global model's arrays (same
names, same order, same shapes and dtypes, finite values) and a MetricRecord
whose ``num-examples`` (the strategy's ``weighted_by_key``) is a positive
integer; no reply may carry more array bytes than ``max_size_factor`` times
the model. Evaluate replies are checked for their metrics and their size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedgpu.flower.failures import Failure

BAD_REPLY = "bad reply"
SIZE_SLACK_BYTES = 1 << 20  # room for small extra arrays beside a tiny model


def _array_bytes(record: ArrayRecord) -> int:
    return sum(len(array.data) for array in record.values())


def check_reply(
    content: RecordDict,
    model: ArrayRecord | None,
    *,
    weighted_by_key: str = "num-examples",
    max_size_factor: float = 2.0,
) -> str | None:
    """What is wrong with one reply's content, in one line (None: nothing).

    ``model``: the arrays a train reply must match; None for evaluate replies.
    """
    model_bytes = _array_bytes(model) if model is not None else 0
    sent = sum(_array_bytes(record) for record in content.array_records.values())
    limit = max_size_factor * model_bytes + SIZE_SLACK_BYTES
    if sent > limit:
        return (f"{sent / 2**20:.1f} MiB of arrays, more than {max_size_factor:g} x the model's "
                f"{model_bytes / 2**20:.1f} MiB")
    if model is not None:
        problem = _check_arrays(content, model)
        if problem:
            return problem
    return _check_metrics(content, weighted_by_key)


def _check_arrays(content: RecordDict, model: ArrayRecord) -> str | None:
    records = content.array_records
    if len(records) != 1:
        return f"{len(records)} array records, expected 1"
    (record,) = records.values()
    names, expected = list(record.keys()), list(model.keys())
    if names != expected:
        missing = [name for name in expected if name not in record]
        extra = [name for name in names if name not in model]
        if len(names) != len(expected):
            count = f"{len(names)} arrays, expected {len(expected)}"
            if missing and not extra:
                return f"{count}: array {missing[0]!r} is missing"
            if extra and not missing:
                return f"{count}: unexpected array {extra[0]!r}"
            return count
        if extra:
            return f"unexpected array {extra[0]!r} where {missing[0]!r} was expected"
        position = next(i for i, (a, b) in enumerate(zip(names, expected)) if a != b)
        return f"arrays out of order: {names[position]!r} at position {position}, expected {expected[position]!r}"
    for name in names:
        got, want = record[name], model[name]
        if tuple(got.shape) != tuple(want.shape):
            return f"array {name!r} has shape {tuple(got.shape)}, expected {tuple(want.shape)}"
        if got.dtype != want.dtype:
            return f"array {name!r} has dtype {got.dtype}, expected {want.dtype}"
        values = got.numpy()
        if values.dtype.kind in "fc" and not np.isfinite(values).all():
            return f"array {name!r} has non-finite values (NaN or inf)"
    return None


def _check_metrics(content: RecordDict, weighted_by_key: str) -> str | None:
    records = content.metric_records
    weights = [record[weighted_by_key] for record in records.values() if weighted_by_key in record]
    if not weights:
        return f"no {weighted_by_key!r} in its metrics"
    for weight in weights:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0 or weight != int(weight):
            return f"{weighted_by_key!r} is {weight!r}, expected a positive integer"
    for record in records.values():
        for key, value in record.items():
            numbers = value if isinstance(value, list) else [value]
            if any(isinstance(number, float) and not math.isfinite(number) for number in numbers):
                return f"metric {key!r} is not finite ({value!r})"
    return None


class CheckedStrategy(Strategy):
    """A Flower strategy whose replies are checked before the wrapped strategy aggregates them.

    ``on_bad_reply(server_round, reply, reason)`` is told of each bad reply
    (besides the error reply that replaces it, which every strategy counts).
    Attributes not defined here are the wrapped strategy's.
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        max_size_factor: float = 2.0,
        weighted_by_key: str | None = None,
        on_bad_reply: Callable[[int, Message, str], None] | None = None,
    ) -> None:
        self.strategy = strategy
        self.max_size_factor = max_size_factor
        self.weighted_by_key = weighted_by_key or getattr(strategy, "weighted_by_key", "num-examples")
        self.on_bad_reply = on_bad_reply
        self._model: ArrayRecord | None = None  # what this round's train replies must match

    def __getattr__(self, name: str) -> Any:
        if name == "strategy":  # not set yet (during unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.strategy, name)

    def summary(self) -> None:
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._model = arrays
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round, self.checked(server_round, replies, self._model))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, self.checked(server_round, replies, None))

    def checked(self, server_round: int, replies: Iterable[Message], model: ArrayRecord | None) -> list[Message]:
        """The replies, each bad one replaced by an error reply that names what is wrong."""
        out = []
        for reply in replies:
            problem = None
            if not reply.has_error():
                try:
                    problem = check_reply(
                        reply.content, model, weighted_by_key=self.weighted_by_key, max_size_factor=self.max_size_factor
                    )
                except Exception as err:  # noqa: BLE001 - a reply we cannot even read is bad too
                    problem = f"unreadable: {type(err).__name__}: {err}"
            if problem is None:
                out.append(reply)
                continue
            if self.on_bad_reply is not None:
                self.on_bad_reply(server_round, reply, problem)
            client = _client_of(reply)
            failure = Failure(BAD_REPLY, problem, client=client, round=server_round)
            out.append(Message(error=failure.to_error(), metadata=reply.metadata))
        return out


def _client_of(reply: Message) -> str:
    """The partition id fedgpu's nodes stamp on their replies, "" for other nodes."""
    from fedgpu.names import FEDGPU_RECORD

    stamp = reply.content.config_records.get(FEDGPU_RECORD) if reply.has_content() else None
    client = stamp.get("client") if stamp is not None else None
    return "" if client is None else str(client)
