"""The one module that talks to NVML (the ``pynvml`` module of nvidia-ml-py).

Everything else sees plain dataclasses, and tests replace ``pynvml`` itself
(the one edge a machine without a GPU cannot reach).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

MIB = 1024 * 1024


class NvmlUnavailable(RuntimeError):
    """No NVML here (no driver, no library, no device); the message says which."""


@dataclass(frozen=True)
class GpuState:
    """One GPU at one moment."""

    index: int  # NVML's (nvidia-smi's) numbering
    uuid: str
    name: str
    used: int  # bytes, every process on the device (ours or not) plus the driver's
    total: int
    utilization: int | None  # percent of time a kernel ran; None where unsupported (MIG)
    processes: dict[int, int] = field(default_factory=dict)  # pid -> bytes, compute processes


class Nvml:
    """An initialised NVML handle; ``sample()`` reads every (or the given) GPU."""

    def __init__(self, module: Any) -> None:
        self._nvml = module
        self._lock = threading.Lock()  # one NVML call at a time from this process
        count = module.nvmlDeviceGetCount()
        if count < 1:
            module.nvmlShutdown()
            raise NvmlUnavailable("NVML sees no GPU")
        self._handles = [module.nvmlDeviceGetHandleByIndex(index) for index in range(count)]
        self.uuids = [_text(module.nvmlDeviceGetUUID(handle)) for handle in self._handles]
        self.names = [_text(module.nvmlDeviceGetName(handle)) for handle in self._handles]

    @classmethod
    def open(cls) -> Nvml:
        try:
            import pynvml
        except ImportError as err:
            raise NvmlUnavailable(f"pynvml is not installed ({err})") from None
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as err:
            raise NvmlUnavailable(f"NVML: {err}") from None
        try:
            return cls(pynvml)
        except pynvml.NVMLError as err:
            pynvml.nvmlShutdown()
            raise NvmlUnavailable(f"NVML: {err}") from None

    @property
    def count(self) -> int:
        return len(self._handles)

    def index_of(self, name: str) -> int | None:
        """An index from ``CUDA_VISIBLE_DEVICES``-style text: a number or a GPU UUID (prefix)."""
        name = name.strip()
        if name.isdigit():
            index = int(name)
            return index if index < self.count else None
        matches = [i for i, uuid in enumerate(self.uuids) if name and uuid.startswith(name)]
        return matches[0] if len(matches) == 1 else None

    def sample(self, indices: list[int] | None = None) -> list[GpuState]:
        nvml = self._nvml
        states = []
        with self._lock:
            for index in range(self.count) if indices is None else indices:
                handle = self._handles[index]
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                try:
                    utilization: int | None = int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
                except nvml.NVMLError:
                    utilization = None
                processes: dict[int, int] = {}
                try:
                    for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                        # usedGpuMemory is None where the driver will not say (e.g. MIG without rights)
                        processes[int(proc.pid)] = processes.get(int(proc.pid), 0) + int(proc.usedGpuMemory or 0)
                except nvml.NVMLError:
                    pass
                states.append(
                    GpuState(index, self.uuids[index], self.names[index], int(memory.used), int(memory.total),
                             utilization, processes)
                )
        return states

    def close(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except Exception:  # noqa: BLE001 - shutting down what may already be gone
            pass


def open_nvml() -> tuple[Nvml | None, str]:
    """(NVML, "") where a GPU can be seen, else (None, why not)."""
    try:
        return Nvml.open(), ""
    except NvmlUnavailable as err:
        return None, str(err)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
