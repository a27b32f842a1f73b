"""ViT-B/16 (ImageNet weights), backbone frozen, a new 102-class head, on Oxford Flowers-102.

As Flower's flowertune-vit example: only the head trains, so only the head's
two arrays (768 x 102 weights and 102 biases, 78 k numbers) travel between
server and clients, never the 86 M backbone parameters; the data is split into
20 partitions by default, whatever the number of client nodes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedgpu.tasks.hub import HubDatasetTask, image_loader, unreachable

if TYPE_CHECKING:
    import datasets
    import torch
    from torch.utils.data import DataLoader

NUM_CLASSES = 102
WEIGHTS = ("IMAGENET1K_V1", "none")
# torchvision's file for ViT_B_16_Weights.IMAGENET1K_V1, as torch.hub caches it.
WEIGHTS_URL = "https://download.pytorch.org/models/vit_b_16-c867db91.pth"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def torch_hub_checkpoints() -> Path:
    """torch.hub's checkpoint directory, found as torch.hub.get_dir() would, without importing torch."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return Path(os.environ.get("TORCH_HOME", cache / "torch")) / "hub" / "checkpoints"


class VitFlowersTask(HubDatasetTask):
    name = "vit-flowers"
    hub_dataset = "nelorth/oxford-flowers"
    default_partitions = 20
    default_local_epochs = 1
    default_lr = 0.01
    preload_modules = ("datasets", "flwr_datasets", "torchvision.models", "torchvision.transforms")
    input_shape = (3, 224, 224)

    @classmethod
    def data_problem(cls, options: dict[str, Any]) -> str | None:
        problem = super().data_problem(options)
        if problem or str(options.get("weights", WEIGHTS[0])) == "none":
            return problem
        cached = torch_hub_checkpoints() / WEIGHTS_URL.rsplit("/", 1)[1]
        if cached.is_file():
            return None
        why = unreachable("download.pytorch.org")
        if why:
            return (f"task {cls.name} needs the ImageNet weights {WEIGHTS_URL}, which is unreachable ({why}); "
                    f"put that file in {cached.parent}, or use --task-option weights=none")
        return None

    def __init__(self, *, batch_size: int = 32, weights: str = WEIGHTS[0], **options: Any) -> None:
        options.setdefault("partitions", self.default_partitions)
        super().__init__(batch_size=batch_size, **options)
        if weights not in WEIGHTS:
            raise ValueError(f"task {self.name}: weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
        self.weights = weights

    def warm_up(self) -> None:
        # The zygote exercises the model's code, not its weights: no download there.
        self.weights = "none"
        super().warm_up()

    def build_model(self) -> torch.nn.Module:
        import torch
        from torchvision.models import ViT_B_16_Weights, vit_b_16

        weights = None if self.weights == "none" else ViT_B_16_Weights[self.weights]
        model = vit_b_16(weights=weights)
        torch.manual_seed(self.seed)  # the same new head everywhere
        model.heads.head = torch.nn.Linear(model.heads.head.in_features, NUM_CLASSES)
        model.requires_grad_(False)
        model.heads.requires_grad_(True)
        return model

    def array_keys(self, model: torch.nn.Module) -> list[str]:
        return [key for key in model.state_dict() if key.startswith("heads.")]

    def _loader(self, dataset: datasets.Dataset, *, shuffle: bool) -> DataLoader:
        from torchvision.transforms import CenterCrop, Compose, Normalize, RandomResizedCrop, Resize, ToTensor

        if shuffle:  # training
            steps: list[Any] = [RandomResizedCrop((224, 224))]
        else:
            steps = [Resize((256, 256)), CenterCrop((224, 224))]
        transform = Compose([*steps, ToTensor(), Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        return image_loader(dataset, transform, image_column="image", batch_size=self.batch_size,
                            shuffle=shuffle, seed=self.seed)
