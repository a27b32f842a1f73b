"""A fake ``pynvml`` for tests on machines without a GPU: the NVML boundary only.

Put this directory first on ``PYTHONPATH`` (or in ``sys.modules``) and point
``FAKE_NVML_DIR`` at a directory holding ``gpus.json``
(``[{"total_mib": 1000, "other_mib": 0, "name": "..."}, ...]``). Processes
"hold" GPU memory through ``fake_cuda.allocate``, which writes ``held/<pid>``;
like a CUDA context, what a process holds is released only when it exits.
Without ``FAKE_NVML_DIR`` it fails as the real one does on a machine without
a driver. Only the calls fedgpu makes are provided.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

MIB = 1024 * 1024
NVML_ERROR_LIBRARY_NOT_FOUND = 12
_initialised = 0


class NVMLError(Exception):
    def __init__(self, value: int, text: str = "") -> None:
        super().__init__(text or f"NVML error {value}")
        self.value = value


class NVMLError_LibraryNotFound(NVMLError):  # the real module's name
    pass


def _dir() -> str:
    directory = os.environ.get("FAKE_NVML_DIR")
    if not directory:
        raise NVMLError_LibraryNotFound(NVML_ERROR_LIBRARY_NOT_FOUND, "NVML Shared Library Not Found")
    return directory


def _gpus() -> list[dict]:
    with open(os.path.join(_dir(), "gpus.json")) as handle:
        return json.load(handle)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def held() -> dict[int, dict[int, int]]:
    """gpu index -> pid -> MiB held, for processes still alive."""
    result: dict[int, dict[int, int]] = {}
    folder = os.path.join(_dir(), "held")
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        pid = int(name)
        if not _alive(pid):
            continue
        try:
            with open(os.path.join(folder, name)) as handle:
                for line in handle:
                    gpu, mib = line.split()
                    result.setdefault(int(gpu), {})[pid] = int(mib)
        except (OSError, ValueError):
            continue
    return result


def nvmlInit() -> None:
    global _initialised
    _dir()
    _initialised += 1


def nvmlShutdown() -> None:
    global _initialised
    _initialised = max(0, _initialised - 1)


def _check() -> None:
    if not _initialised:
        raise NVMLError(1, "Uninitialized")


def nvmlDeviceGetCount() -> int:
    _check()
    return len(_gpus())


def nvmlDeviceGetHandleByIndex(index: int) -> int:
    _check()
    if not 0 <= index < len(_gpus()):
        raise NVMLError(2, "Invalid Argument")
    return index


def nvmlDeviceGetUUID(handle: int) -> str:
    return f"GPU-fake-{handle}"


def nvmlDeviceGetName(handle: int) -> str:
    return _gpus()[handle].get("name", "Fake GPU")


def nvmlDeviceGetMemoryInfo(handle: int) -> SimpleNamespace:
    gpu = _gpus()[handle]
    used = (sum(held().get(handle, {}).values()) + gpu.get("other_mib", 0)) * MIB
    total = gpu["total_mib"] * MIB
    return SimpleNamespace(total=total, used=used, free=max(0, total - used))


def nvmlDeviceGetUtilizationRates(handle: int) -> SimpleNamespace:
    return SimpleNamespace(gpu=50 if held().get(handle) else 0, memory=0)


def nvmlDeviceGetComputeRunningProcesses(handle: int) -> list[SimpleNamespace]:
    return [SimpleNamespace(pid=pid, usedGpuMemory=mib * MIB) for pid, mib in sorted(held().get(handle, {}).items())]
