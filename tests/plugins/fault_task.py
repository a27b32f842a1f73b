"""Digits whose first training call on chosen partitions misbehaves, for the fault tests.

``FEDGPU_FAULTS="0=raise,1=segfault,2=sigkill,3=hang"``: partition 0's first
train raises, 1's segfaults, 2's is SIGKILLed, 3's hangs. Each fault happens
once (a marker in ``FEDGPU_FAULTS_DIR``), so the next round is normal.

More faults: ``sigstop`` (the child stops itself), ``loop`` (spins forever),
``setsid`` (starts a grandchild in a session of its own, writes its pid to
``FEDGPU_FAULTS_DIR/grandchild-<partition>``, then trains normally), ``exit``
(the child exits with status 3 without answering), ``notmessage`` (the
ClientApp answers a dict instead of a Message: only in a child, whose patch
of the ClientApp module dies with it), and bad
replies that train normally but send ``badshape`` (the first array reshaped),
``extra`` (one array too many), ``missing`` (one too few), ``nan`` (a NaN in
the first array) or ``zero`` (0 examples).
``gate`` holds the run in round 1 for a test that must reach it while it surely runs: the child writes
``FEDGPU_FAULTS_DIR/gate-waiting``, waits (600 s at most) for ``FEDGPU_FAULTS_DIR/gate-open``, then trains.
``FEDGPU_SLOW_SERVER_EVAL=S``: the server's evaluation of the global model takes S seconds more;
``FEDGPU_SERVER_EVAL_FAULT=raise``: it raises.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Any

import numpy as np

from fedgpu.tasks.digits import DigitsTask

REPLY_FAULTS = ("badshape", "extra", "missing", "nan", "zero")


def _faults() -> dict[int, str]:
    plan = os.environ.get("FEDGPU_FAULTS", "")
    return {int(part): fault for part, _, fault in (item.partition("=") for item in plan.split(",") if item)}


def _misbehave(fault: str, partition: int) -> None:
    if fault == "raise":
        raise ValueError("injected fault: bad batch")
    if fault == "segfault":
        import ctypes

        ctypes.string_at(0)  # reads address 0: SIGSEGV
    if fault == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault == "hang":
        time.sleep(3600)
    if fault == "sigstop":
        os.kill(os.getpid(), signal.SIGSTOP)
    if fault == "loop":
        while True:
            pass
    if fault == "exit":
        os._exit(3)
    if fault == "notmessage":
        import fedgpu.flower.client_app

        fedgpu.flower.client_app.Message = lambda **_: {"not": "a Message"}  # what the ClientApp's train returns
    if fault == "gate":
        faults_dir = os.environ["FEDGPU_FAULTS_DIR"]
        open(os.path.join(faults_dir, "gate-waiting"), "w").close()
        deadline = time.monotonic() + 600
        while not os.path.exists(os.path.join(faults_dir, "gate-open")) and time.monotonic() < deadline:
            time.sleep(0.1)
    if fault == "setsid":
        grandchild = subprocess.Popen(["sleep", "3600"], start_new_session=True)
        path = os.path.join(os.environ["FEDGPU_FAULTS_DIR"], f"grandchild-{partition}")
        with open(path + ".tmp", "w") as out:
            out.write(str(grandchild.pid))
        os.replace(path + ".tmp", path)


class FaultyDigits(DigitsTask):
    name = "faulty-digits"
    _partition: int | None = None
    _reply_fault: str | None = None

    def load_train_partition(self, partition_id: int, num_partitions: int) -> Any:
        self._partition = partition_id
        return super().load_train_partition(partition_id, num_partitions)

    def load_test_split(self) -> Any:
        time.sleep(float(os.environ.get("FEDGPU_SLOW_SERVER_EVAL", "0")))  # only the server evaluates on it
        if os.environ.get("FEDGPU_SERVER_EVAL_FAULT") == "raise":
            raise OSError("injected fault: the test split is unreadable")
        return super().load_test_split()

    def train(self, model: Any, data: Any, **kwargs: Any) -> dict:
        fault = _faults().get(self._partition) if self._partition is not None else None
        if fault:
            marker = os.path.join(os.environ["FEDGPU_FAULTS_DIR"], f"done-{self._partition}")
            if not os.path.exists(marker):
                open(marker, "w").close()
                if fault in REPLY_FAULTS:
                    self._reply_fault = fault
                else:
                    _misbehave(fault, self._partition)
        metrics = super().train(model, data, **kwargs)
        if self._reply_fault == "zero":
            metrics["num-examples"] = 0
        return metrics

    def get_arrays(self, model: Any) -> list[np.ndarray]:
        arrays = super().get_arrays(model)
        fault = self._reply_fault
        if fault == "badshape":
            arrays[0] = arrays[0].reshape(-1)[:9].reshape(3, 3)
        elif fault == "extra":
            arrays.append(np.zeros(3, dtype=np.float32))
        elif fault == "missing":
            arrays.pop()
        elif fault == "nan":
            arrays[0] = arrays[0].copy()
            arrays[0].flat[0] = np.nan
        return arrays
