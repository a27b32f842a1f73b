"""The digits task, with each train/evaluate holding fake GPU memory (see fake_cuda).

Memory held: ``FAKE_GPU_MIB`` (default 300) for the rest of the process's
life, and the call lasts at least ``FAKE_GPU_HOLD_S`` (default 0.5 s) so a
10 Hz monitor sees it. With ``FAKE_GPU_TRAIN_TOGETHER=N`` train calls meet
in groups of N in the order they arrive (each waits up to 60 s for the rest of
its group) before they allocate, so that N children are on the GPU at once
however the scheduler spreads them out. Real training on the CPU still happens.
"""

from __future__ import annotations

import fcntl
import os
import time
from typing import Any

from fedgpu.tasks.digits import DigitsTask


def _meet_group(size: int, limit_s: float = 60.0) -> None:
    arrived = os.path.join(os.environ["FAKE_NVML_DIR"], "arrived")
    os.makedirs(arrived, exist_ok=True)
    with open(os.path.join(os.environ["FAKE_NVML_DIR"], "lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        ordinal = len(os.listdir(arrived)) + 1
        open(os.path.join(arrived, str(os.getpid())), "w").close()
    group_complete = -(-ordinal // size) * size  # arrivals needed to close this call's group
    deadline = time.monotonic() + limit_s
    while len(os.listdir(arrived)) < group_complete and time.monotonic() < deadline:
        time.sleep(0.05)


def _on_fake_gpu(training: bool) -> None:
    import fake_cuda

    together = int(os.environ.get("FAKE_GPU_TRAIN_TOGETHER", "0"))
    if training and together:
        _meet_group(together)

    fake_cuda.allocate(int(os.environ.get("FAKE_GPU_MIB", "300")))
    time.sleep(float(os.environ.get("FAKE_GPU_HOLD_S", "0.5")))


class FakeGpuDigits(DigitsTask):
    name = "fake-gpu-digits"
    _warming = False

    def warm_up(self) -> None:
        # In the zygote, on the CPU: a real zygote never touches CUDA either.
        self._warming = True
        try:
            super().warm_up()
        finally:
            self._warming = False

    def train(self, model: Any, data: Any, **kwargs: Any) -> dict:
        if not self._warming:
            _on_fake_gpu(training=True)
        return super().train(model, data, **kwargs)

    def evaluate(self, model: Any, data: Any, **kwargs: Any) -> dict:
        if not self._warming:
            _on_fake_gpu(training=False)
        return super().evaluate(model, data, **kwargs)
