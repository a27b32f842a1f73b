"""FedAvg in which exactly K clients train each round, and round 1 waits for M."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fedgpu.flower.recorder import RunRecorder
from fedgpu.flower.settings import RunSettings


class ExactFedAvg(FedAvg):
    """FedAvg with exact sample sizes instead of fractions of available nodes.

    Flower's FedAvg samples ``max(fraction * available, min_train_nodes)``, so
    the number trained drifts with the number connected. Here round 1 starts
    only once ``min_clients`` are connected, and every round trains exactly
    ``sampled`` (and evaluates exactly ``eval_sampled``) clients. Later rounds
    need only ``sampled`` connected, so a run survives a lost node.
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

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.recorder.round_started(server_round)
        sampled = self.settings.sampled
        # sample_nodes(grid, connected, size) waits until `connected` nodes are up.
        node_ids, _ = sample_nodes(grid, self.settings.min_clients if server_round == 1 else sampled, sampled)
        round_config = ConfigRecord(
            {
                **config,
                "server-round": server_round,
                "lr": self.settings.round_lr(server_round),
                "local-epochs": self.settings.local_epochs,
            }
        )
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: round_config})
        messages = list(self._construct_messages(record, node_ids, MessageType.TRAIN))
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
        node_ids, _ = sample_nodes(grid, self.settings.eval_sampled, self.settings.eval_sampled)
        record = RecordDict(
            {self.arrayrecord_key: arrays, self.configrecord_key: ConfigRecord({**config, "server-round": server_round})}
        )
        messages = list(self._construct_messages(record, node_ids, MessageType.EVALUATE))
        self.recorder.sent(server_round, "evaluate", len(messages))
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        self.recorder.replies(server_round, "evaluate", replies)
        return super().aggregate_evaluate(server_round, replies)

