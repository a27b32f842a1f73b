"""What a CUDA program does to a GPU, for the fake NVML: hold memory until exit.

``allocate(mib)`` makes this process hold ``mib`` on the GPU it was given
(``CUDA_VISIBLE_DEVICES``: an index or a fake UUID; GPU 0 when unset), as a
CUDA context plus the caching allocator's peak would. It raises the way torch
does when the device has no room: the OOM that admission control prevents.
``meet(n)`` lets tests put n processes on the GPU at once whatever the load.
"""

from __future__ import annotations

import fcntl
import os
import time

import pynvml


def device_index() -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    if visible.startswith("GPU-fake-"):
        return int(visible.rsplit("-", 1)[1])
    return int(visible) if visible.isdigit() else 0


def allocate(mib: int) -> int:
    """Hold at least ``mib`` MiB on this process's GPU; returns the GPU index."""
    directory = os.environ["FAKE_NVML_DIR"]
    gpu = device_index()
    os.makedirs(os.path.join(directory, "held"), exist_ok=True)
    with open(os.path.join(directory, "lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        held = pynvml.held().get(gpu, {})
        mine = held.get(os.getpid(), 0)
        wanted = max(mine, mib)
        total = pynvml._gpus()[gpu]
        used = sum(held.values()) + total.get("other_mib", 0)
        if used - mine + wanted > total["total_mib"]:
            raise RuntimeError(
                f"CUDA out of memory. Tried to allocate {wanted - mine} MiB (GPU {gpu}; "
                f"{total['total_mib']} MiB total, {used} MiB in use)"
            )
        with open(os.path.join(directory, "held", str(os.getpid())), "w") as out:
            out.write(f"{gpu} {wanted}\n")
    return gpu


def meet(group_size: int, limit_s: float = 60.0) -> None:
    """Wait until the rest of this caller's group has arrived (up to ``limit_s``).

    Callers form groups of ``group_size`` in the order they arrive, so that a
    test can have exactly that many processes allocate together instead of
    relying on how the scheduler happens to spread them out.
    """
    directory = os.environ["FAKE_NVML_DIR"]
    arrived = os.path.join(directory, "arrived")
    os.makedirs(arrived, exist_ok=True)
    with open(os.path.join(directory, "lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        ordinal = len(os.listdir(arrived)) + 1
        open(os.path.join(arrived, str(os.getpid())), "w").close()
    group_complete = -(-ordinal // group_size) * group_size  # arrivals that close this caller's group
    deadline = time.monotonic() + limit_s
    while len(os.listdir(arrived)) < group_complete and time.monotonic() < deadline:
        time.sleep(0.05)
