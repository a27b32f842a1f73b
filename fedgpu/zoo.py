"""The vision-model zoo that `fedgpu bench-models` times (child side: imports torch when called).

Each model is built with random weights (timing does not depend on them) for
``classes`` outputs, and timed on one synthetic in-memory batch of
ImageNet-shaped images, so no dataset and no network are needed. "train"
updates every parameter; "finetune" freezes all but the classifier head (the
model's last Linear layer), as head-only finetuning does.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

# Models torchvision lacks, as torchvision VisionTransformers (DeiT's tiny and small shapes).
VIT_SHAPES = {
    "vit_tiny_16": {"num_layers": 12, "num_heads": 3, "hidden_dim": 192, "mlp_dim": 768},
    "vit_small_16": {"num_layers": 12, "num_heads": 6, "hidden_dim": 384, "mlp_dim": 1536},
}
DEFAULT_MODELS = (
    "resnet18", "resnet34", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large",
    "efficientnet_b0", "vit_tiny_16", "vit_small_16", "vit_b_16",
)


def known_models() -> list[str]:
    """Every classification model name bench-models can build."""
    from torchvision import models

    return sorted(set(models.list_models(module=models)) | set(VIT_SHAPES))


def unknown_models(names: list[str]) -> list[str]:
    known = set(known_models())
    return [name for name in names if name not in known]


def build(name: str, *, classes: int, image_size: int) -> Any:
    from torchvision import models
    from torchvision.models.vision_transformer import VisionTransformer

    if name in VIT_SHAPES:
        return VisionTransformer(image_size=image_size, patch_size=16, num_classes=classes, **VIT_SHAPES[name])
    extra = {"image_size": image_size} if name.startswith("vit_") else {}
    return models.get_model(name, weights=None, num_classes=classes, **extra)


def head_of(model: Any) -> Any:
    """The classifier head: the last Linear layer (fc, classifier[-1], heads.head, ...)."""
    import torch

    linears = [module for module in model.modules() if isinstance(module, torch.nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no Linear layer to finetune")
    return linears[-1]


def _synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time_steps(model: Any, trainable: list, images: Any, labels: Any, batches: int, device: str) -> list[float]:
    """Seconds of each of ``batches`` SGD steps, after one untimed warm-up step."""
    import torch

    optimizer = torch.optim.SGD(trainable, lr=0.01, momentum=0.9)
    criterion = torch.nn.CrossEntropyLoss()
    model.train()
    seconds = []
    for step in range(batches + 1):
        _synchronize(device)
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        outputs = model(images)
        if not isinstance(outputs, torch.Tensor):  # Inception/GoogLeNet in train mode: (logits, aux logits)
            outputs = outputs[0]
        criterion(outputs, labels).backward()
        optimizer.step()
        _synchronize(device)
        if step:  # the first step pays for lazy initialisation (cuDNN autotuning, allocator growth)
            seconds.append(time.perf_counter() - started)
    return seconds


def measure(name: str, *, batches: int, batch_size: int, image_size: int, classes: int, device: str,
            threads: int, seed: int = 0) -> dict[str, Any]:
    """Time ``batches`` train and ``batches`` finetune steps of model ``name``; returns one table row."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(seed)
    model = build(name, classes=classes, image_size=image_size).to(device)
    head = head_of(model)
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=generator).to(device)
    labels = torch.randint(0, classes, (batch_size,), generator=generator).to(device)

    model.requires_grad_(True)
    train = _time_steps(model, list(model.parameters()), images, labels, batches, device)
    model.requires_grad_(False)
    head.requires_grad_(True)
    finetune = _time_steps(model, list(head.parameters()), images, labels, batches, device)
    row: dict[str, Any] = {
        "model": name,
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "params": sum(p.numel() for p in model.parameters()),
        "head_params": sum(p.numel() for p in head.parameters()),
        "train_s": sum(train),
        "train_median_s": statistics.median(train),
        "finetune_s": sum(finetune),
        "finetune_median_s": statistics.median(finetune),
        "torch_peak_bytes": torch.cuda.max_memory_reserved() if device.startswith("cuda") else 0,
    }
    return row
