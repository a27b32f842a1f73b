"""Digits whose first training call on chosen partitions misbehaves, for the fault tests.

``FEDGPU_FAULTS="0=raise,1=segfault,2=sigkill,3=hang"``: partition 0's first
train raises, 1's segfaults, 2's is SIGKILLed, 3's hangs. Each fault happens
once (a marker in ``FEDGPU_FAULTS_DIR``), so the next round is normal.
``FEDGPU_SLOW_SERVER_EVAL=S``: the server's evaluation of the global model takes S seconds more.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from fedgpu.tasks.digits import DigitsTask


def _faults() -> dict[int, str]:
    plan = os.environ.get("FEDGPU_FAULTS", "")
    return {int(part): fault for part, _, fault in (item.partition("=") for item in plan.split(",") if item)}


def _misbehave(fault: str) -> None:
    if fault == "raise":
        raise ValueError("injected fault: bad batch")
    if fault == "segfault":
        import ctypes

        ctypes.string_at(0)  # reads address 0: SIGSEGV
    if fault == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault == "hang":
        time.sleep(3600)


class FaultyDigits(DigitsTask):
    name = "faulty-digits"
    _partition: int | None = None

    def load_train_partition(self, partition_id: int, num_partitions: int) -> Any:
        self._partition = partition_id
        return super().load_train_partition(partition_id, num_partitions)

    def load_test_split(self) -> Any:
        time.sleep(float(os.environ.get("FEDGPU_SLOW_SERVER_EVAL", "0")))  # only the server evaluates on it
        return super().load_test_split()

    def train(self, model: Any, data: Any, **kwargs: Any) -> dict:
        fault = _faults().get(self._partition) if self._partition is not None else None
        if fault:
            marker = os.path.join(os.environ["FEDGPU_FAULTS_DIR"], f"done-{self._partition}")
            if not os.path.exists(marker):
                open(marker, "w").close()
                _misbehave(fault)
        return super().train(model, data, **kwargs)
