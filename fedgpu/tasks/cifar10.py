"""CIFAR-10 with the Flower PyTorch quickstart CNN, via flwr-datasets."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedgpu.tasks.base import Task

if TYPE_CHECKING:
    import datasets
    import torch
    from flwr_datasets import FederatedDataset
    from torch.utils.data import DataLoader

HUB_DATASET = "uoft-cs/cifar10"
SPLITS = ("train", "test")


def parquet_files(data_files: str) -> dict[str, list[str]]:
    """Map "train"/"test" to parquet files from a directory or a comma list.

    A file belongs to the split its name starts with, so both `train.parquet`
    and the Hub's `train-00000-of-00001.parquet` layout work.
    """
    entries = [Path(entry.strip()) for entry in data_files.split(",") if entry.strip()]
    if len(entries) == 1 and entries[0].is_dir():
        candidates = sorted(entries[0].glob("*.parquet"))
    else:
        candidates = entries
    missing = [str(path) for path in candidates if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"cifar10 data_files: not found: {', '.join(missing)}")
    files = {
        split: [str(path) for path in candidates if path.name.startswith(split)]
        for split in SPLITS
    }
    for split, paths in files.items():
        if not paths:
            raise FileNotFoundError(
                f"cifar10 data_files {data_files!r}: no {split}*.parquet file"
            )
    return files


def hub_cached(repo: str) -> bool:
    """Whether the Hub dataset ``repo`` is in a local Hugging Face cache already."""
    import os

    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    owner, _, name = repo.partition("/")
    candidates = [
        Path(os.environ.get("HF_HUB_CACHE", home / "hub")) / f"datasets--{owner}--{name}",
        Path(os.environ.get("HF_DATASETS_CACHE", home / "datasets")) / f"{owner}___{name}",
    ]
    return any(path.is_dir() for path in candidates)


def hub_unreachable(timeout: float = 3.0) -> str:
    """Why the Hugging Face Hub cannot be reached from here ("" if it can)."""
    import os
    import socket

    for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(flag, "").lower() in ("1", "true", "yes", "on"):
            return f"{flag} is set"
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
    except OSError as error:
        return error.strerror or str(error) or type(error).__name__
    return ""


class Cifar10Task(Task):
    """Quickstart CNN on CIFAR-10; `data_files` points at local parquet files."""

    name = "cifar10"
    default_local_epochs = 1
    default_lr = 0.01
    preload_modules = ("datasets", "flwr_datasets", "torchvision.transforms")
    input_shape = (3, 32, 32)

    @classmethod
    def data_problem(cls, options: dict[str, Any]) -> str | None:
        data_files = str(options.get("data_files") or "")
        if data_files:
            try:
                parquet_files(data_files)
            except FileNotFoundError as error:
                detail = str(error).replace(f"cifar10 data_files {data_files!r}: ", "").replace("cifar10 data_files: ", "")
                return f"--data-files {data_files}: {detail}"
            return None
        if hub_cached(HUB_DATASET):
            return None
        why = hub_unreachable()
        if why:
            return (f"task cifar10 downloads {HUB_DATASET} from the Hugging Face Hub, which is unreachable ({why}); "
                    "give --data-files DIR with train*.parquet and test*.parquet")
        return None

    def __init__(self, *, data_files: str = "", **options: Any) -> None:
        super().__init__(**options)
        self.data_files = data_files
        # One FederatedDataset per partition count: it binds its partitioner.
        self._federated: dict[int, FederatedDataset] = {}

    def build_model(self) -> torch.nn.Module:
        import torch
        from torch import nn

        torch.manual_seed(self.seed)
        return nn.Sequential(
            nn.Conv2d(3, 6, 5),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, 10),
        )

    def federated_dataset(self, num_partitions: int) -> FederatedDataset:
        from flwr_datasets import FederatedDataset

        if num_partitions not in self._federated:
            partitioners = {"train": self.make_partitioner(num_partitions)}
            if self.data_files:
                source: dict[str, Any] = {
                    "dataset": "parquet",
                    "data_files": parquet_files(self.data_files),
                }
            else:
                source = {"dataset": HUB_DATASET}
            self._federated[num_partitions] = FederatedDataset(
                **source, partitioners=partitioners, seed=self.seed
            )
        return self._federated[num_partitions]

    def partition(self, partition_id: int, num_partitions: int) -> datasets.Dataset:
        fds = self.federated_dataset(num_partitions)
        return self._download_guard(lambda: fds.load_partition(partition_id, "train"))

    def test_dataset(self) -> datasets.Dataset:
        # The test split does not depend on the partitioning: reuse any instance.
        num_partitions = next(iter(self._federated), 1)
        fds = self.federated_dataset(num_partitions)
        return self._download_guard(lambda: fds.load_split("test"))

    def load_train_partition(self, partition_id: int, num_partitions: int) -> DataLoader:
        return self._loader(self.partition(partition_id, num_partitions), shuffle=True)

    def load_test_split(self) -> DataLoader:
        return self._loader(self.test_dataset(), shuffle=False)

    def _download_guard(self, load: Any) -> datasets.Dataset:
        """Turn a failed Hub download into one line that points at `data_files`."""
        if self.data_files:
            return load()
        try:
            return load()
        except OSError as error:  # ConnectionError, DatasetNotFoundError, ...
            raise RuntimeError(
                f"cifar10: could not load {HUB_DATASET!r} from the Hugging Face Hub "
                f"({type(error).__name__}: {error}); without network access, set the "
                "task option data_files to a directory with train.parquet and "
                "test.parquet"
            ) from None

    def _loader(self, dataset: datasets.Dataset, *, shuffle: bool) -> DataLoader:
        import torch
        from torch.utils.data import DataLoader
        from torchvision.transforms import Compose, Normalize, ToTensor

        transform = Compose([ToTensor(), Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])

        def collate(rows: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
            images = torch.stack([transform(row["img"].convert("RGB")) for row in rows])
            labels = torch.tensor([row["label"] for row in rows], dtype=torch.long)
            return images, labels

        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            collate_fn=collate,
            generator=generator,
        )
