"""One of fedgpu's tasks and its options, checked into :class:`RunSettings` (``fedgpu run`` and ``fedgpu server``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedgpu.errors import BadInput
from fedgpu.flower.config import parse_task_options
from fedgpu.flower.settings import RunSettings


def check_task_run(
    options: dict[str, Any], *, min_clients: int, sampled: int, run_dir: Path | None = None
) -> RunSettings:
    """The run settings of one of fedgpu's tasks from the shared options; BadInput if they cannot work."""
    from fedgpu.tasks import UnknownTaskError, data_problem, resolve_task

    task = str(options["task"])
    try:
        resolve_task(task)
        task_options = json.dumps(parse_task_options(options["task_options"]))
    except (UnknownTaskError, ValueError) as err:
        raise BadInput(str(err)) from None
    run = RunSettings(
        task=task, num_rounds=int(options["rounds"]), min_clients=int(options["min_clients"] or min_clients),
        sampled=int(options["sampled"] or sampled), eval_sampled=int(options["eval_sampled"]),
        lr=float(options["lr"] or 0.0), lr_decay=float(options["lr_decay"]),
        local_epochs=int(options["local_epochs"] or 0), batch_size=int(options["batch_size"]),
        partitioner=str(options["partitioner"]), alpha=float(options["alpha"]), seed=int(options["seed"]),
        data_files=str(options["data_files"]), task_options_json=task_options,
        isolation=str(options.get("isolation") or "zygote"), device=str(options["device"]),
        threads=int(options["threads"]),
        message_timeout=float(options["message_timeout"]), start_timeout=float(options["start_timeout"]),
        run_dir=str(run_dir or ""),
    )
    problem = data_problem(task, run.task_options())
    if problem:
        raise BadInput(problem)
    return run
