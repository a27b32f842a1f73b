"""One run's settings, as CLI options and as Flower run config (hyphenated keys)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any

from fedgpu.tasks.work import WorkSettings

ISOLATION_MODES = ("zygote", "spawn", "none")


@dataclass(frozen=True)
class RunSettings:
    task: str = "digits"
    num_rounds: int = 3
    min_clients: int = 2
    sampled: int = 2  # exactly this many clients train each round
    eval_sampled: int = 0  # clients that evaluate the global model on their data
    lr: float = 0.0  # 0: the task's own default_lr
    lr_decay: float = 1.0  # lr of round r = lr * lr_decay ** (r - 1)
    local_epochs: int = 0  # 0: the task's own default_local_epochs
    batch_size: int = 0  # 0: the task's own default
    partitioner: str = "iid"
    alpha: float = 0.5  # Dirichlet concentration
    seed: int = 42
    data_files: str = ""  # local dataset files instead of a hub download
    task_options_json: str = ""  # more task options (--task-option KEY=VALUE), a JSON object of strings
    run_dir: str = ""
    isolation: str = "zygote"  # how the server's own torch work is isolated
    device: str = "auto"
    threads: int = 1
    message_timeout: float = 600.0  # how long a round waits for its replies (and a message may run)
    start_timeout: float = 300.0  # how long a round waits for enough client nodes

    def to_run_config(self) -> dict[str, Any]:
        return {name.replace("_", "-"): value for name, value in asdict(self).items()}

    @classmethod
    def from_run_config(cls, config: dict[str, Any]) -> RunSettings:
        kinds = {f.name: type(getattr(cls(), f.name)) for f in fields(cls)}
        values = {}
        for key, value in config.items():
            name = key.replace("-", "_")
            if name in kinds:
                values[name] = kinds[name](value)
        return cls(**values)

    def round_lr_scale(self, server_round: int) -> float:
        """What round ``server_round`` multiplies the learning rate by."""
        return self.lr_decay ** (server_round - 1)

    def work(self) -> WorkSettings:
        return WorkSettings(self.task, self.task_options(), self.device, self.threads)

    def task_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"partitioner": self.partitioner, "alpha": self.alpha, "seed": self.seed}
        if self.batch_size:
            options["batch_size"] = self.batch_size
        if self.data_files:
            options["data_files"] = self.data_files
        if self.task_options_json:
            options.update(json.loads(self.task_options_json))
        return options
