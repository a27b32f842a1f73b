"""Tasks: a model factory, partitioned data, train and test.

The parent (server/launcher) side only resolves task names, so this module must
stay free of torch, torchvision, datasets, flwr_datasets and sklearn; the task
modules themselves are imported only inside child processes by `load_task`.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedgpu.tasks.base import Task

BUILTIN_TASKS: dict[str, str] = {
    "digits": "fedgpu.tasks.digits:DigitsTask",
    "cifar10": "fedgpu.tasks.cifar10:Cifar10Task",
    "vit-flowers": "fedgpu.tasks.vit_flowers:VitFlowersTask",
    "text-imdb": "fedgpu.tasks.text_imdb:TextImdbTask",
}


class UnknownTaskError(ValueError):
    """A task name that is neither builtin nor an importable `module:Class`."""

    def __init__(self, name: str, reason: str = "") -> None:
        known = ", ".join(sorted({**installed_tasks(), **BUILTIN_TASKS}))
        detail = f": {reason}" if reason else ""
        super().__init__(
            f"unknown task {name!r}{detail} "
            f"(known: {known}; or give package.module:TaskClass)"
        )
        self.name = name


TASK_ENTRY_POINTS = "fedgpu.tasks"


def installed_tasks() -> dict[str, str]:
    """Tasks other packages register by name, as entry points in the group ``fedgpu.tasks``:

        [project.entry-points."fedgpu.tasks"]
        my-task = "my_package.tasks:MyTask"
    """
    from importlib.metadata import entry_points

    return {entry.name: entry.value for entry in entry_points(group=TASK_ENTRY_POINTS)}


def _module_exists(module: str) -> bool:
    # find_spec imports parent packages of a dotted name and raises (instead of
    # returning None) when one of them is missing.
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def resolve_task(name: str) -> str:
    """Return the `module:Class` reference for a builtin name or a user reference.

    A user reference is only checked for an existing module, not imported.
    """
    name = name.strip()
    if name in BUILTIN_TASKS:
        return BUILTIN_TASKS[name]
    if ":" not in name:
        installed = installed_tasks()
        if name in installed:
            return installed[name]
        raise UnknownTaskError(name)
    module, _, class_name = name.partition(":")
    if not module or not class_name.isidentifier():
        raise UnknownTaskError(name, "expected package.module:TaskClass")
    if not _module_exists(module):
        raise UnknownTaskError(name, f"module {module!r} not found")
    return name


def load_task(name: str, options: dict[str, Any] | None = None) -> Task:
    """Resolve, import and instantiate a task (child processes only)."""
    module_name, _, class_name = resolve_task(name).partition(":")
    module = importlib.import_module(module_name)
    task_class = getattr(module, class_name, None)
    if not isinstance(task_class, type):
        raise UnknownTaskError(
            name, f"module {module_name!r} has no class {class_name!r}"
        )
    return task_class(**(options or {}))


def _load_in_child(name: str, options: dict[str, Any]) -> None:
    load_task(name, options)


def data_problem(name: str, options: dict[str, Any], timeout: float = 300.0) -> str | None:
    """A one-line problem with the options or the data of a task (None: none found).

    Builtin task modules import torch only inside methods, so the parent side
    may construct and ask them; a user's task module is never imported here:
    it is loaded once in a spawned child, so that a module that does not
    import is found before anything starts.
    """
    if name.strip() not in BUILTIN_TASKS:
        from fedgpu.isolation import IsolationError, Isolator

        with Isolator("spawn") as isolator:
            try:
                isolator.run(_load_in_child, (name, options), timeout=timeout)
            except IsolationError as err:
                return f"task {name!r} does not load: {err.reason}"
        return None
    module_name, _, class_name = BUILTIN_TASKS[name.strip()].partition(":")
    task_class = getattr(importlib.import_module(module_name), class_name)
    try:
        task_class(**options)
    except (TypeError, ValueError) as error:
        return str(error)
    return task_class.data_problem(options)


__all__ = ["BUILTIN_TASKS", "UnknownTaskError", "data_problem", "installed_tasks", "load_task", "resolve_task"]
