"""What a zygote imports and exercises before it forks: for fedgpu's tasks, and for a user's Flower app."""

from __future__ import annotations

import importlib
import sys

RUNNER = "fedgpu.flower.runner"  # what every child unpickles its call into
TORCH_LAZY_MODULES = "fedgpu.flower.warm_ups:import_torch_lazy_modules"


def zygote_warm_ups(*tasks: str) -> list[str]:
    """What a zygote serving these tasks imports and exercises before it forks.

    The runner and the ClientApp module (and the flwr modules they import) are
    what every child unpickles its call into; each task's own warm-up builds its
    model and runs one CPU step.
    """
    warm_ups = ["torch", RUNNER, "fedgpu.flower.client_app"]
    return warm_ups + [f"fedgpu.tasks.work:warm_up={task}" for task in tasks]


def app_warm_ups(client_module: str, *, optional: bool = False) -> list[str]:
    """What a zygote serving a user's Flower app imports: our runner, the app's ClientApp module with what
    it imports (torch, if it uses it), then torch's lazy modules; nothing is exercised, CUDA least of all.

    ``optional``: the app's module may fail to import there (its children import it themselves).
    """
    return [RUNNER, f"?{client_module}" if optional else client_module, TORCH_LAZY_MODULES]


def import_torch_lazy_modules() -> None:
    """If torch is loaded, import what it loads lazily at a process's first optimizer: ``torch._dynamo``.

    That costs each fresh child 2 s of CPU here (900 modules, sympy among them) unless its zygote paid it
    once; a module that imports torchvision has paid it already, one that imports torch alone has not.
    Nothing is started: no thread, no CUDA.
    """
    if "torch" in sys.modules:
        importlib.import_module("torch._dynamo")
