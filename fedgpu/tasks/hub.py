"""Tasks whose data is a Hugging Face Hub dataset, read through flwr-datasets.

``FederatedDataset`` downloads the dataset on first use; without network,
``data_files`` points the same code at local parquet files of the dataset's
schema (the Hub's own layout, ``train-00000-of-00001.parquet``, works as is).
Subclasses name the dataset and turn rows into batches (``_loader``).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedgpu.tasks.base import Task

if TYPE_CHECKING:
    import datasets
    from flwr_datasets import FederatedDataset
    from torch.utils.data import DataLoader

SPLITS = ("train", "test")


def parquet_files(data_files: str, owner: str = "") -> dict[str, list[str]]:
    """Map "train"/"test" to parquet files from a directory or a comma list.

    A file belongs to the split its name starts with, so both `train.parquet`
    and the Hub's `train-00000-of-00001.parquet` layout work.
    """
    owner = owner or f"data_files {data_files!r}"  # how errors name the setting
    entries = [Path(entry.strip()) for entry in data_files.split(",") if entry.strip()]
    if len(entries) == 1 and entries[0].is_dir():  # noqa: SIM108 - two plain cases read better than one long line
        candidates = sorted(entries[0].glob("*.parquet"))
    else:
        candidates = entries
    missing = [str(path) for path in candidates if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"{owner}: not found: {', '.join(missing)}")
    files = {split: [str(path) for path in candidates if path.name.startswith(split)] for split in SPLITS}
    for split, paths in files.items():
        if not paths:
            raise FileNotFoundError(f"{owner}: no {split}*.parquet file")
    return files


def hub_cached(repo: str, kind: str = "datasets") -> bool:
    """Whether the Hub repository ``repo`` (of ``kind`` datasets or models) is in a local cache already."""
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    owner, _, name = repo.partition("/")
    candidates = [Path(os.environ.get("HF_HUB_CACHE", home / "hub")) / f"{kind}--{owner}--{name}"]
    if kind == "datasets":  # `datasets` also keeps its own Arrow copies
        candidates.append(Path(os.environ.get("HF_DATASETS_CACHE", home / "datasets")) / f"{owner}___{name}")
    return any(path.is_dir() for path in candidates)


def unreachable(host: str, flags: tuple[str, ...] = (), timeout: float = 3.0) -> str:
    """Why ``host``:443 cannot be reached from here ("" if it can); set offline ``flags`` count too."""
    for flag in flags:
        if os.environ.get(flag, "").lower() in ("1", "true", "yes", "on"):
            return f"{flag} is set"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as error:
        return error.strerror or str(error) or type(error).__name__
    return ""


def hub_unreachable(timeout: float = 3.0) -> str:
    """Why the Hugging Face Hub cannot be reached from here ("" if it can)."""
    return unreachable("huggingface.co", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"), timeout)


class HubDatasetTask(Task):
    """Partitions of a Hub dataset (or local parquet files of its schema) as batches."""

    hub_dataset: str = ""  # e.g. "uoft-cs/cifar10"

    @classmethod
    def data_problem(cls, options: dict[str, Any]) -> str | None:
        data_files = str(options.get("data_files") or "")
        if data_files:
            try:
                parquet_files(data_files, owner=f"--data-files {data_files}")
            except FileNotFoundError as error:
                return str(error)
            return None
        if hub_cached(cls.hub_dataset):
            return None
        why = hub_unreachable()
        if why:
            return (f"task {cls.name} downloads {cls.hub_dataset} from the Hugging Face Hub, which is unreachable "
                    f"({why}); give --data-files DIR with train*.parquet and test*.parquet")
        return None

    def __init__(self, *, data_files: str = "", **options: Any) -> None:
        super().__init__(**options)
        self.data_files = data_files
        # One FederatedDataset per partition count: it binds its partitioner.
        self._federated: dict[int, FederatedDataset] = {}

    def federated_dataset(self, num_partitions: int) -> FederatedDataset:
        from flwr_datasets import FederatedDataset

        if num_partitions not in self._federated:
            partitioners = {"train": self.make_partitioner(num_partitions)}
            if self.data_files:
                source: dict[str, Any] = {
                    "dataset": "parquet",
                    "data_files": parquet_files(self.data_files, owner=f"{self.name} data_files {self.data_files!r}"),
                }
            else:
                source = {"dataset": self.hub_dataset}
            self._federated[num_partitions] = FederatedDataset(**source, partitioners=partitioners, seed=self.seed)
        return self._federated[num_partitions]

    def partition(self, partition_id: int, num_partitions: int) -> datasets.Dataset:
        fds = self.federated_dataset(num_partitions)
        return self._download_guard(lambda: fds.load_partition(partition_id, "train"))

    def test_dataset(self) -> datasets.Dataset:
        # The test split does not depend on the partitioning: reuse any instance.
        fds = self.federated_dataset(next(iter(self._federated), 1))
        return self._download_guard(lambda: fds.load_split("test"))

    def load_train_partition(self, partition_id: int, num_partitions: int) -> DataLoader:
        return self._loader(self.partition(partition_id, num_partitions), shuffle=True)

    def load_test_split(self) -> DataLoader:
        return self._loader(self.test_dataset(), shuffle=False)

    def _loader(self, dataset: datasets.Dataset, *, shuffle: bool) -> DataLoader:
        raise NotImplementedError

    def _download_guard(self, load: Callable[[], datasets.Dataset]) -> datasets.Dataset:
        """Turn a failed Hub download into one line that points at `data_files`."""
        if self.data_files:
            return load()
        try:
            return load()
        except OSError as error:  # ConnectionError, DatasetNotFoundError, ...
            raise RuntimeError(
                f"{self.name}: could not load {self.hub_dataset!r} from the Hugging Face Hub "
                f"({type(error).__name__}: {error}); without network access, set the "
                "task option data_files to a directory with train.parquet and "
                "test.parquet"
            ) from None


def image_loader(
    dataset: datasets.Dataset, transform: Callable[[Any], Any], *, image_column: str, batch_size: int,
    shuffle: bool, seed: int,
) -> DataLoader:
    """(images, labels) batches; images decoded and transformed as each batch is drawn."""
    import torch
    from torch.utils.data import DataLoader

    def collate(rows: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.stack([transform(row[image_column].convert("RGB")) for row in rows])
        labels = torch.tensor([row["label"] for row in rows], dtype=torch.long)
        return images, labels

    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collate, generator=generator)
