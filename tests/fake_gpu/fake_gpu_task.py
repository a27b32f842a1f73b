"""The digits task, with each train/evaluate holding fake GPU memory (see fake_cuda).

Memory held: ``FAKE_GPU_MIB`` (default 300) for the rest of the process's
life, and the call lasts at least ``FAKE_GPU_HOLD_S`` (default 0.5 s) so a
10 Hz monitor sees it. With ``FAKE_GPU_TRAIN_TOGETHER=N`` train calls meet
in groups of N in the order they arrive (each waits up to 60 s for the rest of
its group) before they allocate, so that N children are on the GPU at once
however the scheduler spreads them out. Real training on the CPU still happens.
"""

from __future__ import annotations

import os
import time
from typing import Any

from fedgpu.tasks.digits import DigitsTask


def _on_fake_gpu(training: bool) -> None:
    import fake_cuda

    together = int(os.environ.get("FAKE_GPU_TRAIN_TOGETHER", "0"))
    if training and together:
        fake_cuda.meet(together)
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
