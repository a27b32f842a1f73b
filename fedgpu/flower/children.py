"""Which of a Flower run's children are placed on a GPU; the placing itself is ``fedgpu.children``.

Shared by the client nodes' task runner, the simulation host and the
ServerApp's own evaluation.
"""

from __future__ import annotations

from fedgpu.children import run_child
from fedgpu.nvml.placement import GpuPlacer

__all__ = ["placer_for", "run_child", "wants_placement"]


def wants_placement(device: object) -> bool:
    """Placement applies where the run lets the child pick its device (not cpu, not pinned to cuda:N)."""
    return str(device) in ("auto", "cuda")


def placer_for(placer: GpuPlacer | None, device: object) -> GpuPlacer | None:
    return placer if wants_placement(device) else None
