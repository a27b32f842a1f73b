"""The work a child does for a federation, in terms of Tasks and NumPy arrays.

These functions run inside isolated children (or in-process for the baseline);
they import torch when called, never at import. Arrays in and out are NumPy,
so the parent never needs torch to read them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from fedgpu.tasks import load_task


@dataclass(frozen=True)
class WorkSettings:
    """Which task, with which options, on which device."""

    task: str
    options: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"  # auto: cuda when available, else cpu
    threads: int = 1  # CPU threads per child: K children share the host's cores


_tasks: dict[str, Any] = {}  # one Task per (name, options) in a process; a zygote's are its children's too


def task_for(name: str, options: dict[str, Any] | None = None) -> Any:
    """The task ``name`` with ``options``, made once per process: what it has loaded (its splits, its
    partitioners) serves every later call, and, made in a zygote, every child forked from it."""
    key = json.dumps([name, options or {}], sort_keys=True, default=str)
    task = _tasks.get(key)
    if task is None:
        task = _tasks[key] = load_task(name, options)
    return task


def _setup(settings: WorkSettings):
    import torch

    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    device = settings.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return task_for(settings.task, settings.options), device


def warm_up(task: str) -> None:
    """A zygote's warm-up for ``task`` (on CPU; CUDA stays untouched)."""
    load_task(task).warm_up()


def warm_up_run(spec: str) -> None:
    """A zygote's warm-up for one run: ``{"task", "options", "partitions"}`` as JSON. The task is made
    with the run's options and loads what it has locally (``Task.prepare_data``), once for every child."""
    wanted = json.loads(spec)
    task_for(str(wanted["task"]), dict(wanted.get("options") or {})).prepare_data(int(wanted["partitions"]))


def initial_arrays(settings: WorkSettings) -> dict:
    """The initial model as name -> array (its state_dict's names, in order)."""
    task, _ = _setup(settings)
    model = task.build_model()
    return dict(zip(task.array_keys(model), task.get_arrays(model)))


def initial_model(settings: WorkSettings) -> tuple[dict, dict]:
    """The initial model (as ``initial_arrays``) and the task's own defaults for what a run leaves at 0:
    ``lr``, ``local-epochs`` and ``batch-size`` (the one the task was built with)."""
    task, _ = _setup(settings)
    model = task.build_model()
    defaults = {"lr": task.default_lr, "local-epochs": task.default_local_epochs, "batch-size": task.batch_size}
    return dict(zip(task.array_keys(model), task.get_arrays(model))), defaults


def _model_with(task: Any, arrays: list, device: str) -> Any:
    model = task.build_model()
    task.set_arrays(model, arrays)
    return model.to(device)


def evaluate_global(settings: WorkSettings, arrays: list) -> dict:
    """Server side: the global model on the task's held-out test split."""
    task, device = _setup(settings)
    return task.evaluate(_model_with(task, arrays, device), task.load_test_split(), device=device)


def train_partition(
    settings: WorkSettings, arrays: list, partition_id: int, num_partitions: int, *, epochs: int, lr: float,
    lr_scale: float = 1.0,
) -> tuple[list, dict, list[str]]:
    """Client side: local training on one partition; returns new arrays, metrics and warnings.

    ``epochs`` or ``lr`` 0: the task's own ``default_local_epochs`` / ``default_lr``; the
    learning rate used is ``lr * lr_scale``. Both are reported in the metrics.
    """
    task, device = _setup(settings)
    epochs = epochs or task.default_local_epochs
    lr = (lr or task.default_lr) * lr_scale
    model = _model_with(task, arrays, device)
    data = task.load_train_partition(*task.partition_of(partition_id, num_partitions))
    metrics = task.train(model, data, epochs=epochs, lr=lr, device=device)
    metrics = {**metrics, "lr": lr, "local-epochs": epochs}
    return task.get_arrays(model), metrics, partition_warnings(data, partition_id, num_partitions)


def partition_warnings(data: Any, partition_id: int, num_partitions: int) -> list[str]:
    """A partition smaller than one batch trains on less than the batch size says: say so."""
    batch = getattr(data, "batch_size", None)
    try:
        size = len(data.dataset)
    except (AttributeError, TypeError):
        return []
    if isinstance(batch, int) and size < batch:
        return [f"partition {partition_id} of {num_partitions} holds {size} examples, fewer than one batch ({batch})"]
    return []


def evaluate_partition(settings: WorkSettings, arrays: list, partition_id: int, num_partitions: int) -> dict:
    """Client side: the global model on this client's own data."""
    task, device = _setup(settings)
    model = _model_with(task, arrays, device)
    return task.evaluate(model, task.load_train_partition(*task.partition_of(partition_id, num_partitions)),
                         device=device)
