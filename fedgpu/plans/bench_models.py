"""``fedgpu bench-models``: its options checked into a :class:`~fedgpu.bench_models.BenchPlan`."""

from __future__ import annotations

from typing import Any

from fedgpu.bench_models import BenchPlan, BenchSettings, check_models


def plan_bench_models(options: dict[str, Any]) -> BenchPlan:
    """Check every option of ``fedgpu bench-models``; BadInput names the first problem.

    The model names are asked of torchvision in a spawned child: the parent never imports torch.
    """
    import re
    import tempfile
    import time
    from pathlib import Path

    from fedgpu.errors import BadInput
    from fedgpu.isolation import Isolator
    from fedgpu.nvml.placement import check_placement
    from fedgpu.zoo import DEFAULT_MODELS

    models = tuple(m.strip() for m in str(options["models"] or ",".join(DEFAULT_MODELS)).split(",") if m.strip())
    if not models:
        raise BadInput("--models: no model named")
    device = str(options["device"])
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise BadInput(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    image_size = int(options["image_size"])
    if any(m.startswith("vit_") for m in models) and image_size % 16:
        raise BadInput(f"--image-size {image_size}: ViT models need a multiple of 16")
    csv_path = str(options["csv_path"] or Path("runs") / time.strftime("bench-models-%Y%m%d-%H%M%S.csv"))
    if Path(csv_path).is_dir():
        raise BadInput(f"--csv {csv_path}: is a directory")
    csv_dir = Path(csv_path).absolute().parent
    try:  # a file created and removed there, as the CSV will be written at the end
        csv_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=csv_dir):
            pass
    except OSError as err:
        raise BadInput(f"--csv {csv_path}: not writable: {err.strerror or err}") from None
    placement = check_placement(options, children=True) if device in ("auto", "cuda") else None
    with Isolator("spawn") as isolator:
        unknown = check_models(isolator, models)
    if unknown:
        raise BadInput(f"--models: unknown model(s) {', '.join(unknown)} "
                       "(torchvision names, or vit_tiny_16, vit_small_16)")
    settings = BenchSettings(models, int(options["batches"]), int(options["batch_size"]), image_size,
                             device=device, threads=int(options["threads"]), timeout=float(options["timeout"]))
    return BenchPlan(settings, csv_path, placement)
