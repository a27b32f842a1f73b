"""What a zygote imports and exercises before it forks: for fedgpu's tasks, and for a user's Flower app."""

from __future__ import annotations


def zygote_warm_ups(*tasks: str) -> list[str]:
    """What a zygote serving these tasks imports and exercises before it forks.

    The runner and the ClientApp module (and the flwr modules they import) are
    what every child unpickles its call into; each task's own warm-up builds its
    model and runs one CPU step.
    """
    warm_ups = ["torch", "fedgpu.flower.runner", "fedgpu.flower.client_app"]
    return warm_ups + [f"fedgpu.tasks.work:warm_up={task}" for task in tasks]


def app_warm_ups(client_module: str) -> list[str]:
    """What a zygote serving a user's Flower app imports: our runner and the app's ClientApp
    module, with what it imports (torch, if it uses it); nothing is exercised, CUDA least of all."""
    return ["fedgpu.flower.runner", client_module]
