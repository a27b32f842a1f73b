"""FedAvg in which exactly K clients train each round, and round 1 waits (bounded) for M."""

from __future__ import annotations

import random
import time
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedgpu.errors import FedgpuError
from fedgpu.flower.recorder import RunRecorder
from fedgpu.flower.settings import RunSettings
from fedgpu.names import EXIT_TOO_FEW_NODES

NODE_POLL_SECONDS = 0.5


class TooFewNodes(FedgpuError):
    """Fewer nodes than a round needs registered within the start timeout."""

    exit_code = EXIT_TOO_FEW_NODES

    def __init__(self, connected: int, needed: int, timeout: float, server_round: int) -> None:
        self.connected, self.needed, self.timeout, self.server_round = connected, needed, timeout, server_round
        verb = "registered" if server_round == 1 else f"connected for round {server_round}"
        super().__init__(f"only {connected} of {needed} client nodes {verb} within {timeout:g} s")


def wait_for_nodes(grid: Grid, needed: int, timeout: float, server_round: int) -> list[int]:
    """The connected node ids once at least ``needed`` are connected; TooFewNodes after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= needed:
            return nodes
        if time.monotonic() >= deadline:
            raise TooFewNodes(len(nodes), needed, timeout, server_round)
        time.sleep(NODE_POLL_SECONDS)


class ExactFedAvg(FedAvg):
    """FedAvg with exact sample sizes instead of fractions of available nodes.

    Flower's FedAvg samples ``max(fraction * available, min_train_nodes)``, so
    the number trained drifts with the number connected, and it waits for
    nodes forever. Here round 1 starts once ``min_clients`` are connected,
    every round trains exactly ``sampled`` (and evaluates exactly
    ``eval_sampled``) clients, and no wait for nodes lasts longer than
    ``start_timeout``. Later rounds need only ``sampled`` connected, so a run
    survives a lost node. Messages live as long as the round waits for them.
    """

    def __init__(self, settings: RunSettings, recorder: RunRecorder) -> None:
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=1.0 if settings.eval_sampled else 0.0,
            min_train_nodes=settings.sampled,
            min_evaluate_nodes=settings.eval_sampled,
            min_available_nodes=settings.min_clients,
        )
        self.settings = settings
        self.recorder = recorder

    def _sample(self, grid: Grid, server_round: int, connected: int, size: int) -> list[int]:
        nodes = wait_for_nodes(grid, max(connected, size), self.settings.start_timeout, server_round)
        return random.sample(nodes, size)

    def _messages(self, record: RecordDict, node_ids: list[int], message_type: str) -> list[Message]:
        ttl = self.settings.message_timeout
        return [Message(content=record, dst_node_id=node, message_type=message_type, ttl=ttl) for node in node_ids]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.recorder.round_started(server_round)
        sampled = self.settings.sampled
        node_ids = self._sample(grid, server_round, self.settings.min_clients if server_round == 1 else sampled,
                                sampled)
        round_config = ConfigRecord(
            {
                **config,
                "server-round": server_round,
                # 0: the task's own default, which only the child (which imports the task) knows.
                "lr": self.settings.lr,
                "lr-scale": self.settings.round_lr_scale(server_round),
                "local-epochs": self.settings.local_epochs,
            }
        )
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: round_config})
        messages = self._messages(record, node_ids, MessageType.TRAIN)
        self.recorder.sent(server_round, "train", len(messages))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self.recorder.replies(server_round, "train", replies)
        return super().aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if not self.settings.eval_sampled:
            return []
        node_ids = self._sample(grid, server_round, self.settings.eval_sampled, self.settings.eval_sampled)
        record = RecordDict(
            {
                self.arrayrecord_key: arrays,
                self.configrecord_key: ConfigRecord({**config, "server-round": server_round}),
            }
        )
        messages = self._messages(record, node_ids, MessageType.EVALUATE)
        self.recorder.sent(server_round, "evaluate", len(messages))
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        self.recorder.replies(server_round, "evaluate", replies)
        return super().aggregate_evaluate(server_round, replies)
