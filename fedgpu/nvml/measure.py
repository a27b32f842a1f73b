"""A child's own peak GPU memory, measured as it finishes (child side).

Only a child that placement gave a GPU (``FEDGPU_GPU`` in its environment)
measures: NVML's view of this pid now, plus what torch's caching allocator held
at its peak beyond what it holds now. This is the figure admission control
learns a task's estimate from. It reaches the parent as a child fact
(``fedgpu.isolation.facts``), which placement registers: every isolated child
of a process that places children reports it.
"""

from __future__ import annotations

import os
import sys

from fedgpu.names import FEDGPU_GPU

# Where NVML cannot see our pid (a container's own pid namespace): what a CUDA
# context typically costs on top of what torch's allocator reserves.
CONTEXT_ALLOWANCE_BYTES = 512 * 1024 * 1024


def gpu_peak_bytes() -> int:
    """This process's peak GPU memory in bytes; 0 when not placed or not measurable."""
    if not os.environ.get(FEDGPU_GPU):
        return 0
    try:
        return _measure()
    except Exception:  # noqa: BLE001 - a failed measurement must not cost the call its result
        return 0


def _measure() -> int:
    torch = sys.modules.get("torch")
    cuda_started = torch is not None and torch.cuda.is_initialized()
    above_now = 0
    if cuda_started:
        above_now = max(0, torch.cuda.max_memory_reserved() - torch.cuda.memory_reserved())
    from fedgpu.nvml.devices import open_nvml

    nvml, _ = open_nvml()
    if nvml is None:
        return 0
    try:
        pid = os.getpid()
        held = sum(state.processes.get(pid, 0) for state in nvml.sample())
    finally:
        nvml.close()
    if held == 0 and cuda_started:
        held = torch.cuda.memory_reserved() + CONTEXT_ALLOWANCE_BYTES
    return held + above_now

