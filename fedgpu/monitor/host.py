"""Host memory of every process of one run, sampled in a background thread.

A process is ours when its environment carries the run's marker (the launcher
exports ``FEDGPU_RUN_DIR``; every process below inherits it, zygote children
included). RSS counts pages shared between processes once per process, so the
sum over-counts forked children and the zygote; PSS (proportional set size)
splits shared pages among their users, and its sum is the memory really used.
Both totals are recorded. Never imports torch.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import psutil

from fedgpu.names import RUN_DIR_ENV as MARKER  # one name for the run's marker
from fedgpu.nvml.devices import MIB
from fedgpu.output import write_json


def process_kind(cmdline: list[str], zygote_pids: set[int], ppid: int, parent_cmdline: list[str] | None = None) -> str:
    """What a process of ours is, from its command line and parent.

    A process with its parent's very command line is a fork that has not
    exec'd yet (``subprocess`` between fork and exec, a helper a library
    starts): it is not a second node, server or launcher, whatever that
    command line says.
    """
    if ppid in zygote_pids or "fedgpu.isolation.child" in cmdline:
        return "call-child"
    if cmdline and cmdline == parent_cmdline:
        return "fork"
    if "fedgpu.isolation.zygote" in cmdline:
        return "zygote"
    for position, arg in enumerate(cmdline[:-1]):
        if os.path.basename(arg) == "fedgpu":  # `fedgpu SUBCOMMAND ...`
            return {"client": "client-node", "zygote": "zygote"}.get(cmdline[position + 1], "server-side")
    return "server-side"  # SuperLink, SuperExec, ServerApp, flwr run, probes


def _proc_field_bytes(path: str, field: str) -> int | None:
    """A "Field:  N kB" line of a /proc file, in bytes; None if unreadable."""
    try:
        with open(path) as lines:
            for line in lines:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def pss_bytes(pid: int) -> int | None:
    return _proc_field_bytes(f"/proc/{pid}/smaps_rollup", "Pss")


def host_available_bytes() -> int | None:
    return _proc_field_bytes("/proc/meminfo", "MemAvailable")


@dataclass
class _Peak:
    total_rss: int = 0
    processes: int = 0
    at: float = 0.0


@dataclass
class HostMemorySampler:
    """RSS of the run's processes at each ``sample()``, PSS at most every ``pss_interval``.

    RSS comes from ``/proc/PID/statm`` (cheap); PSS needs a walk of each
    process's page tables (``smaps_rollup``), which for a hundred nodes costs
    a sizeable part of a core, so it is sampled less often.
    """

    marker_value: str
    interval: float = 1.0  # as its caller samples it; for the summary
    pss_interval: float = 10.0
    marker: str = MARKER
    samples: int = 0
    peak: _Peak = field(default_factory=_Peak)
    _ours: dict[tuple[int, float], bool] = field(default_factory=dict)
    _per_kind: dict[str, dict[int, int]] = field(default_factory=dict)  # kind -> pid -> peak rss
    _kind_counts: dict[str, int] = field(default_factory=dict)
    _last_pss: float = float("-inf")
    peak_total_pss: int = 0
    pss_samples: int = 0
    min_available: int | None = None  # the host's MemAvailable: the room left
    available_now: int | None = None

    def _is_ours(self, proc: psutil.Process, created: float | None = None) -> bool:
        key = (proc.pid, created if created is not None else proc.info["create_time"] or 0.0)
        if key not in self._ours:
            try:
                self._ours[key] = proc.environ().get(self.marker) == self.marker_value
            except (psutil.Error, OSError):
                self._ours[key] = False
        return self._ours[key]

    def sample(self) -> list[tuple[int, str, int]]:
        """Sample once; returns (pid, kind, RSS bytes) of every process of ours."""
        ours = []
        for proc in psutil.process_iter(["create_time", "ppid", "cmdline", "memory_info"]):
            if proc.info["memory_info"] is not None and self._is_ours(proc):
                ours.append(proc)
        zygote_pids = {p.pid for p in ours if process_kind(p.info["cmdline"] or [], set(), -1) == "zygote"}
        cmdlines = {p.pid: p.info["cmdline"] or [] for p in ours}
        total_rss = 0
        counts: dict[str, int] = {}
        rows = []
        for proc in ours:
            rss = proc.info["memory_info"].rss
            total_rss += rss
            kind = process_kind(proc.info["cmdline"] or [], zygote_pids, proc.info["ppid"],
                                cmdlines.get(proc.info["ppid"]))
            rows.append((proc.pid, kind, rss))
            counts[kind] = counts.get(kind, 0) + 1
            peaks = self._per_kind.setdefault(kind, {})
            peaks[proc.pid] = max(peaks.get(proc.pid, 0), rss)
        for kind, count in counts.items():
            self._kind_counts[kind] = max(self._kind_counts.get(kind, 0), count)
        self.samples += 1
        available = host_available_bytes()
        self.available_now = available
        if available is not None:
            self.min_available = available if self.min_available is None else min(self.min_available, available)
        if total_rss > self.peak.total_rss:
            self.peak = _Peak(total_rss, len(ours), time.time())
        if time.monotonic() - self._last_pss >= self.pss_interval:
            self._last_pss = time.monotonic()
            self.pss_samples += 1
            total_pss = sum(pss_bytes(proc.pid) or proc.info["memory_info"].rss for proc in ours)
            self.peak_total_pss = max(self.peak_total_pss, total_pss)
        return rows

    def is_ours(self, pid: int) -> bool:
        """Whether ``pid`` is a process of this run (for pids another source reports)."""
        try:
            proc = psutil.Process(pid)
            return self._is_ours(proc, proc.create_time())
        except psutil.Error:
            return False

    def summary(self) -> dict[str, Any]:
        by_kind = {}
        for kind, peaks in sorted(self._per_kind.items()):
            values = [rss / MIB for rss in peaks.values()]
            by_kind[kind] = {
                "processes_seen": len(values),
                "most_at_once": self._kind_counts.get(kind, 0),
                "median_peak_rss_mib": round(statistics.median(values), 1),
                "max_peak_rss_mib": round(max(values), 1),
            }
        return {
            "what": f"processes whose environment has {self.marker}={self.marker_value}",
            "interval_s": self.interval,
            "samples": self.samples,
            "pss_interval_s": self.pss_interval,
            "pss_samples": self.pss_samples,
            "peak_total_rss_mib": round(self.peak.total_rss / MIB, 1),
            "processes_at_rss_peak": self.peak.processes,
            "peak_total_pss_mib": round(self.peak_total_pss / MIB, 1),
            "host_total_mib": round(psutil.virtual_memory().total / MIB, 1),
            "host_min_available_mib": None if self.min_available is None else round(self.min_available / MIB, 1),
            "by_kind": by_kind,
        }


def merge_into_report(report_path: str, key: str, value: Any) -> None:
    """Add ``key`` to a JSON report (created if the run never wrote one)."""
    import json

    report: dict[str, Any] = {}
    try:
        with open(report_path) as existing:
            report = json.load(existing)
    except (OSError, ValueError):
        pass
    report[key] = value
    write_json(report_path, report)
