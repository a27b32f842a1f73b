"""The run's memory timeline: GPUs through NVML at ~10 Hz, host RSS alongside.

Runs in ``fedgpu server`` (a thread; never imports torch). Every sample goes to
``memory.csv`` as it is taken, so an interrupted run keeps its timeline; at the
end ``memory.json`` and ``memory.png`` are derived from it (``summary``,
``plot``). Pids are mapped to a client, round and message through the run's
events (``events.jsonl``): the task runners and the ServerApp report each
child's pid when it starts. Without NVML or a GPU only host rows are written,
and the summary says so.
"""

from __future__ import annotations

import csv
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil

from fedgpu.monitor.events import EventsTail, emit
from fedgpu.monitor.host import HostMemorySampler
from fedgpu.nvml.devices import MIB, Nvml
from fedgpu.output import OutputError, open_output

TIMELINE_FILE = "memory.csv"
COLUMNS = (
    "time",  # unix seconds
    "source",  # gpu | gpu-process | host | host-process
    "gpu",  # NVML index (gpu rows)
    "pid",
    "role",  # client-node, client-child, server-child, zygote, zygote-spare, server-side, other (not ours)
    "client",  # partition id
    "round",
    "message",  # train | evaluate | server-evaluate | initial
    "used_mib",  # gpu: used by everything on the device; gpu-process: that pid; host: RSS summed over ours
    "total_mib",
    "available_mib",  # host rows: the host's MemAvailable
    "util_percent",
)


@dataclass
class _Who:
    role: str
    client: Any = ""
    round: Any = ""
    message: str = ""


@dataclass
class PidRegistry:
    """pid -> who, from the run's events."""

    who: dict[int, _Who] = field(default_factory=dict)
    current_round: Any = ""

    def absorb(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            kind, pid = event.get("event"), event.get("pid")
            if kind == "round-start":
                self.current_round = event.get("round", "")
            elif kind == "round-end":
                self.current_round = ""
            elif kind == "node-start" and pid:
                self.who[pid] = _Who("client-node", event.get("client", ""))
            elif kind == "simulation-start" and pid:  # the ServerApp and every virtual node in one process
                self.who[pid] = _Who("simulation-host", "")
            elif kind == "child-start" and pid:
                base = self.who.get(pid)
                # A node that runs its messages itself (no isolation) stays a node, busy.
                role = (base.role if base is not None and base.role == "client-node"
                        else event.get("role", "client-child"))
                self.who[pid] = _Who(role, event.get("client", ""), event.get("round", ""), event.get("message", ""))
            elif kind == "child-end" and pid in self.who:
                who = self.who[pid]
                if who.role == "client-node":
                    who.round, who.message = "", ""
                else:
                    del self.who[pid]  # gone; its pid may come back as someone else


class MemoryMonitor:
    def __init__(
        self,
        run_dir: str,
        marker_value: str,
        *,
        nvml: Nvml | None,
        no_gpu_reason: str = "",
        gpu_interval: float = 0.1,
        host_interval: tuple[float, float] = (0.2, 2.0),
        host_budget: float = 0.05,
        on_error: Callable[[OutputError], None] | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.nvml = nvml
        self.no_gpu_reason = no_gpu_reason
        self.gpu_interval = gpu_interval
        # Host sampling walks every process of the run: it is paced to cost at
        # most `host_budget` of a core, between these two intervals.
        self.host_interval = host_interval
        self.host_budget = host_budget
        self.host = HostMemorySampler(marker_value)
        self.registry = PidRegistry()
        self._events = EventsTail(run_dir)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.path = os.path.join(run_dir, TIMELINE_FILE)
        self.error: OutputError | None = None  # why the timeline stopped, if it could not be written
        self.on_error = on_error
        self._last_at = 0.0
        self._file = open_output(self.path, "w")
        try:
            self._csv = csv.writer(self._file)
            self._csv.writerow(COLUMNS)
        except OSError as err:
            raise OutputError(self.path, err) from None
        self._host_total_mib = _mib(psutil.virtual_memory().total)  # fixed for the run: read once

    def start(self) -> MemoryMonitor:
        gpus = []
        if self.nvml is not None:
            gpus = [{"index": g.index, "uuid": g.uuid, "name": g.name, "total_mib": round(g.total / MIB, 1)}
                    for g in self.nvml.sample()]
        emit("monitor-start", self.run_dir, gpus=gpus, no_gpu=self.no_gpu_reason, gpu_interval_s=self.gpu_interval,
             pid=os.getpid())
        self._thread = threading.Thread(target=self._loop, name="fedgpu-memory-monitor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Take a last sample, close the timeline."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self._file.close()
        except OSError as err:
            self.error = self.error or OutputError(self.path, err)
        if self.nvml is not None:
            self.nvml.close()

    def _loop(self) -> None:
        try:
            self._sample_until_stopped()
        except OSError as err:  # the run directory is full or gone: stop sampling, say so once
            self.error = OutputError(self.path, err)
            if self.on_error is not None:
                self.on_error(self.error)

    def _sample_until_stopped(self) -> None:
        now = time.monotonic()
        next_gpu = next_host = now
        host_interval = self.host_interval[0]
        last_flush = now
        while True:
            stopping = self._stop.is_set()
            self.registry.absorb(self._events.read_new())
            now = time.monotonic()
            if self.nvml is not None and (now >= next_gpu or stopping):
                self.sample_gpus()
                # Behind schedule (a busy host): the next sample one interval from now, not at once.
                next_gpu = max(next_gpu + self.gpu_interval, now + self.gpu_interval / 2)
            if now >= next_host or stopping:
                self.sample_host()
                cost = time.monotonic() - now
                low, high = self.host_interval
                host_interval = min(high, max(low, cost / self.host_budget))
                next_host = now + host_interval
            if now - last_flush >= 1.0:
                self._file.flush()
                last_flush = now
            if stopping:
                self.host.interval = host_interval
                return
            self._stop.wait(max(0.0,
                                min(next_gpu if self.nvml is not None else next_host, next_host) - time.monotonic()))

    def _who(self, pid: int, fallback_role: str) -> _Who:
        who = self.registry.who.get(pid)
        if who is not None:
            return who
        # A zygote child no call has announced: the spare, forked ahead of the next call.
        return _Who("zygote-spare" if fallback_role == "call-child" else fallback_role)

    def _now(self) -> str:
        """This sample's time: strictly later than the last one's, so no two samples share a moment."""
        at = max(time.time(), self._last_at + 1e-6)
        self._last_at = at
        return f"{at:.6f}"

    def sample_gpus(self) -> None:
        assert self.nvml is not None
        at = self._now()
        for gpu in self.nvml.sample():
            self._csv.writerow(
                [at, "gpu", gpu.index, "", "", "", self.registry.current_round, "", _mib(gpu.used), _mib(gpu.total), "",
                 "" if gpu.utilization is None else gpu.utilization]
            )
            for pid, used in sorted(gpu.processes.items()):
                who = self.registry.who.get(pid) or _Who("ours" if self.host.is_ours(pid) else "other")
                self._csv.writerow([at, "gpu-process", gpu.index, pid, who.role, who.client, who.round, who.message,
                                    _mib(used), "", "", ""])

    def sample_host(self) -> None:
        at = self._now()
        rows = self.host.sample()
        total = sum(rss for _, _, rss in rows)
        self._csv.writerow(
            [at, "host", "", "", "", "", self.registry.current_round, "", _mib(total), self._host_total_mib,
             _mib(self.host.available_now or 0), ""]
        )
        for pid, kind, rss in rows:
            who = self._who(pid, kind)
            self._csv.writerow([at, "host-process", "", pid, who.role, who.client, who.round, who.message,
                                _mib(rss), "", "", ""])


def _mib(value: int) -> str:
    return f"{value / MIB:.1f}"

