"""Task base class: options, partitioning, default classification train/test.

torch, numpy and flwr_datasets are imported inside methods so that importing
this module (e.g. for type hints on the parent side) stays cheap and torch-free.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch
    from flwr_datasets.partitioner import Partitioner

PARTITIONERS = ("iid", "dirichlet")


class Task:
    """A federated learning task; subclasses implement model and data loading."""

    name: str = "task"
    # Recommended client hyper-parameters for this task (callers may override).
    default_local_epochs: int = 1
    default_lr: float = 0.01
    # What a zygote loads before it forks children for this task (see warm_up).
    preload_modules: tuple[str, ...] = ()
    input_shape: tuple[int, ...] | None = None  # one example, for warm_up's dummy batch

    def __init__(
        self,
        *,
        partitioner: str = "iid",
        alpha: float = 0.5,
        seed: int = 42,
        batch_size: int = 32,
        partitions: int | str | None = None,
        **unknown: Any,
    ) -> None:
        if unknown:
            raise TypeError(
                f"task {self.name!r} got unknown option(s): {', '.join(sorted(unknown))}"
            )
        if partitioner not in PARTITIONERS:
            raise ValueError(
                f"unknown partitioner {partitioner!r} (known: {', '.join(PARTITIONERS)})"
            )
        # Options may arrive as strings from a run config; coerce them once here.
        self.partitioner = partitioner
        self.alpha = float(alpha)
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha!r}")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size!r}")
        # How many parts the training data is split into: one per client node
        # (None), or a fixed count that client nodes' partition ids index into.
        self.partitions = None if partitions in (None, "", 0, "0") else int(partitions)  # type: ignore[arg-type]
        if self.partitions is not None and self.partitions < 1:
            raise ValueError(f"partitions must be > 0, got {partitions!r}")

    # --- to implement -------------------------------------------------------

    def build_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def load_train_partition(self, partition_id: int, num_partitions: int) -> Iterable:
        """Batches of one client's partition of the training data."""
        raise NotImplementedError

    def partition_of(self, partition_id: int, num_partitions: int) -> tuple[int, int]:
        """(partition id, partition count) of a client node's data under the `partitions` option."""
        count = self.partitions or num_partitions
        if not 0 <= partition_id < count:
            raise ValueError(
                f"task {self.name!r} splits its data into {count} partitions; there is no partition {partition_id} "
                "(set the task option partitions, or run fewer client nodes)"
            )
        return partition_id, count

    def load_test_split(self) -> Iterable:
        """Batches of the held-out test split (server-side central evaluation)."""
        raise NotImplementedError

    def prepare_data(self, num_partitions: int) -> None:
        """Load, once in a zygote before it forks, what every child of a run would load again: data that is
        already on this host, split and partitioned for ``num_partitions`` clients. Nothing by default (a
        task that downloads must not do it here). Must never initialise CUDA nor leave a thread running."""

    @classmethod
    def data_problem(cls, options: dict[str, Any]) -> str | None:
        """Before a run starts: a one-line reason why this task's data cannot be
        loaded with these options (a missing file, a download with no network), or None."""
        return None

    def warm_up(self) -> None:
        """Import and exercise the CPU paths once, in a zygote, before it forks.

        Children forked afterwards skip these imports and the lazy ones behind
        the first optimizer step. Must never initialise CUDA.
        """
        import importlib

        import torch

        for module in self.preload_modules:
            importlib.import_module(module)
        model = self.build_model()
        if self.input_shape is not None:
            batch = [(torch.zeros((2, *self.input_shape)), torch.zeros(2, dtype=torch.long))]
            self.train(model, batch, epochs=1, lr=0.0, device="cpu")
            self.evaluate(model, batch, device="cpu")

    # --- partitioning -------------------------------------------------------

    def make_partitioner(
        self, num_partitions: int, min_partition_size: int = 10
    ) -> Partitioner:
        """A flwr-datasets partitioner for this task's `partitioner` option."""
        from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

        if self.partitioner == "iid":
            return IidPartitioner(num_partitions=num_partitions)
        return DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=self.alpha,
            min_partition_size=min_partition_size,
            self_balancing=True,
            seed=self.seed,
        )

    # --- default classification train/evaluate on (inputs, labels) batches --

    def train(
        self, model: torch.nn.Module, data: Iterable, *, epochs: int, lr: float, device: str
    ) -> dict[str, float | int]:
        """SGD (momentum 0.9) on cross-entropy; reports the last epoch's mean loss."""
        import torch

        model.to(device)
        model.train()
        criterion = torch.nn.CrossEntropyLoss()
        # Only what trains: a frozen backbone needs no gradients and no optimizer state.
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9)
        loss_sum, num_examples = 0.0, 0
        for _ in range(epochs):
            loss_sum, num_examples = 0.0, 0
            for inputs, labels in data:
                inputs, labels = inputs.to(device), labels.to(device)
                optimizer.zero_grad()
                loss = criterion(model(inputs), labels)
                loss.backward()
                optimizer.step()
                loss_sum += loss.item() * labels.size(0)
                num_examples += labels.size(0)
        return {
            "train-loss": loss_sum / max(num_examples, 1),
            "num-examples": num_examples,
        }

    def evaluate(
        self, model: torch.nn.Module, data: Iterable, *, device: str
    ) -> dict[str, float | int]:
        """Mean cross-entropy loss and accuracy over all batches."""
        import torch

        model.to(device)
        model.eval()
        criterion = torch.nn.CrossEntropyLoss(reduction="sum")
        loss_sum, correct, num_examples = 0.0, 0, 0
        with torch.no_grad():
            for inputs, labels in data:
                inputs, labels = inputs.to(device), labels.to(device)
                outputs = model(inputs)
                loss_sum += criterion(outputs, labels).item()
                correct += (outputs.argmax(dim=1) == labels).sum().item()
                num_examples += labels.size(0)
        denominator = max(num_examples, 1)
        return {
            "loss": loss_sum / denominator,
            "accuracy": correct / denominator,
            "num-examples": num_examples,
        }

    # --- weights exchanged with the server ----------------------------------

    def array_keys(self, model: torch.nn.Module) -> list[str]:
        """state_dict keys sent to/received from the server (override to send a head)."""
        return list(model.state_dict().keys())

    def get_arrays(self, model: torch.nn.Module) -> list[np.ndarray]:
        state = model.state_dict()
        return [state[key].detach().cpu().numpy().copy() for key in self.array_keys(model)]

    def set_arrays(self, model: torch.nn.Module, arrays: list[np.ndarray]) -> None:
        import torch

        keys = self.array_keys(model)
        if len(arrays) != len(keys):
            raise ValueError(
                f"task {self.name!r} expects {len(keys)} arrays, got {len(arrays)}"
            )
        state = model.state_dict()
        for key, array in zip(keys, arrays):
            if tuple(array.shape) != tuple(state[key].shape):
                raise ValueError(
                    f"task {self.name!r}: array for {key!r} has shape "
                    f"{tuple(array.shape)}, expected {tuple(state[key].shape)}"
                )
        # Only after validating everything, so a bad list leaves the model intact.
        with torch.no_grad():
            for key, array in zip(keys, arrays):
                # torch.tensor copies, so read-only arrays (e.g. from bytes) are fine.
                state[key].copy_(torch.tensor(array))
