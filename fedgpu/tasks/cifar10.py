"""CIFAR-10 with the Flower PyTorch quickstart CNN, via flwr-datasets."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedgpu.tasks.hub import HubDatasetTask, image_loader

if TYPE_CHECKING:
    import datasets
    import torch
    from torch.utils.data import DataLoader


class Cifar10Task(HubDatasetTask):
    """Quickstart CNN on CIFAR-10 (``uoft-cs/cifar10``); `data_files` points at local parquet files."""

    name = "cifar10"
    hub_dataset = "uoft-cs/cifar10"
    default_local_epochs = 1
    default_lr = 0.01
    preload_modules = ("datasets", "flwr_datasets", "torchvision.transforms")
    input_shape = (3, 32, 32)

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

    def _loader(self, dataset: datasets.Dataset, *, shuffle: bool) -> DataLoader:
        from torchvision.transforms import Compose, Normalize, ToTensor

        # The quickstart's normalisation.
        transform: Any = Compose([ToTensor(), Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
        return image_loader(dataset, transform, image_column="img", batch_size=self.batch_size,
                            shuffle=shuffle, seed=self.seed)
