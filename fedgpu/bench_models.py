"""`fedgpu bench-models`: train and finetune time per vision model, each in its own child (parent side).

The parent never imports torch: each model is measured by ``fedgpu.zoo.measure``
in a fresh spawned child, which exits afterwards, so one model's memory (and
CUDA context) never counts towards the next one's peak. On a GPU the child is
placed like a federation's children and its peak is NVML's view of it; on the
CPU its peak is the child's maximum RSS (which includes torch itself).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from fedgpu.children import run_child
from fedgpu.isolation import IsolationError, Isolator
from fedgpu.nvml.devices import MIB
from fedgpu.nvml.placement import GpuPlacer, PlacementSettings

COLUMNS = (
    "model", "device", "params", "head_params", "batches", "batch_size", "image_size",
    "train_s", "train_median_s", "finetune_s", "finetune_median_s", "peak_mib", "peak_source", "error",
)


@dataclass(frozen=True)
class BenchSettings:
    models: tuple[str, ...]
    batches: int = 5
    batch_size: int = 32
    image_size: int = 224
    classes: int = 1000
    device: str = "auto"
    threads: int = 0
    timeout: float = 1800.0


@dataclass(frozen=True)
class BenchPlan:
    """What ``fedgpu bench-models`` will measure, where it writes the CSV, and how it places its children;
    made, its options checked, by ``fedgpu.plans.bench_models.plan_bench_models``."""

    settings: BenchSettings
    csv_path: str
    placement: PlacementSettings | None  # None: the CPU, or the one device named


def check_models(isolator: Isolator, models: tuple[str, ...]) -> list[str]:
    """The names among ``models`` that torchvision and the zoo do not know (asked in a child)."""
    from fedgpu import zoo

    return isolator.run(zoo.unknown_models, (list(models),), timeout=300).value


def measure_all(settings: BenchSettings, isolator: Isolator, placer: GpuPlacer | None,
                on_row: Callable[[dict[str, Any]], None] = lambda row: None) -> list[dict[str, Any]]:
    rows = []
    # With a placer the child gets one GPU (CUDA_VISIBLE_DEVICES) and says "cuda".
    device = "cuda" if placer is not None else settings.device
    kwargs = {"batches": settings.batches, "batch_size": settings.batch_size, "image_size": settings.image_size,
              "classes": settings.classes, "device": device, "threads": settings.threads}
    for model in settings.models:
        row: dict[str, Any] = {"model": model, "batches": settings.batches, "batch_size": settings.batch_size,
                               "image_size": settings.image_size}
        try:
            outcome, _ = run_child(isolator, placer, _measure_one, (model, kwargs), key=f"bench-models/{model}",
                                   who={"model": model}, role="bench-child", timeout=settings.timeout)
        except IsolationError as error:
            row["error"] = str(error).splitlines()[0]
        else:
            row.update(outcome.value)
            torch_peak = row.pop("torch_peak_bytes")
            if outcome.gpu_peak_bytes:
                row["peak_mib"], row["peak_source"] = outcome.gpu_peak_bytes / MIB, "nvml"
            elif torch_peak:
                row["peak_mib"], row["peak_source"] = torch_peak / MIB, "torch-reserved"
            else:
                row["peak_mib"], row["peak_source"] = outcome.max_rss_kib / 1024, "rss"
        rows.append(row)
        on_row(row)
    return rows


def _measure_one(model: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    from fedgpu import zoo

    return zoo.measure(model, **kwargs)


def write_csv(path: str, rows: list[dict[str, Any]]) -> None:
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({column: _csv_value(row.get(column, "")) for column in COLUMNS})


def _csv_value(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) else value


def print_table(rows: list[dict[str, Any]], out: TextIO) -> None:
    if not rows:
        return
    first = rows[0]
    out.write(f"{first['batches']} batches of {first['batch_size']} x 3 x {first['image_size']}^2 "
              "(synthetic), after one untimed warm-up step; times are medians per batch\n")
    header = (f"{'model':<20} {'params':>10} {'head':>9} {'train s':>9} {'finetune s':>11} {'ratio':>6} "
              f"{'peak MiB':>9}  device")
    out.write(header + "\n" + "-" * len(header) + "\n")
    for row in rows:
        if row.get("error"):
            out.write(f"{row['model']:<20} failed: {row['error']}\n")
            continue
        ratio = row["train_median_s"] / row["finetune_median_s"] if row["finetune_median_s"] else float("nan")
        out.write(f"{row['model']:<20} {row['params'] / 1e6:>9.2f}M {row['head_params'] / 1e3:>8.1f}k "
                  f"{row['train_median_s']:>9.3f} {row['finetune_median_s']:>11.3f} {ratio:>5.1f}x "
                  f"{row['peak_mib']:>9.0f}  {row['device']} ({row['peak_source']})\n")


def run_bench_models(plan: BenchPlan, say: Callable[..., None]) -> int:
    """``fedgpu bench-models`` once its options are checked (``fedgpu.plans.bench_models``): measure each
    model in its own child, write the CSV, print the table; 1 if a model failed, else 0."""
    import sys

    settings = plan.settings
    placer: GpuPlacer | None = None
    if plan.placement is not None:
        placer = GpuPlacer.from_settings(plan.placement, log=lambda line: say(f"[fedgpu] {line}", err=True))
    where = "a placed GPU" if placer else settings.device
    say(f"[fedgpu] {len(settings.models)} model(s) on {where}; CSV: {plan.csv_path}", err=True)
    try:
        with Isolator("spawn") as isolator:
            rows = measure_all(settings, isolator, placer,
                               on_row=lambda row: say(f"[fedgpu] {row['model']}: "
                                                      f"{'failed' if row.get('error') else 'done'}", err=True))
    finally:
        if placer is not None:
            placer.close()
    write_csv(plan.csv_path, rows)
    print_table(rows, sys.stdout)
    return 1 if any(row.get("error") for row in rows) else 0
