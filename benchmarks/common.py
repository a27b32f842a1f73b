"""Shared helpers for the benchmarks: medians, markdown tables, result files.

Every benchmark measures the things it compares side by side in one run, prints
a markdown table of medians and ratios, and writes it (with the raw samples as
JSON) under ``benchmarks/results/``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 1024 * 1024
BIN = Path(sys.executable).parent
# Every process of one measured run carries MARKER=<its own value>, inherited from the command started.
MARKER = "FEDGPU_BENCH_MARKER"
# Quiet, offline, and running the app in this environment (what runs against Flower's Simulation Engine).
QUIET = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_USAGE_STATS_ENABLED": "0",
         "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


def child_pids(pid: int) -> list[int]:
    """The children of ``pid`` (forked by any of its threads); [] once it is gone."""
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            found += [int(child) for child in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    except OSError:
        pass
    return found


def marked(marker: str) -> dict[int, str]:
    """pid -> command line of every process whose environment has MARKER=``marker``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if f"{MARKER}={marker}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
    return found


def stop_marked(marker: str) -> None:
    """Stop every process of a measured run, with all it started (TERM, then KILL)."""
    from fedgpu.isolation.procs import stop_tree

    for pid in marked(marker):
        stop_tree(pid, 5.0)


def local_simulation_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of ``flwr run APP local``: a FLWR_HOME (made here) whose default connection is the local
    Simulation Engine, this environment's Flower first on PATH, and no fedgpu zygote to inherit."""
    from fedgpu.net import free_port

    home.mkdir(parents=True)
    (home / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n')
    env = {**os.environ, **QUIET, **extra, "FLWR_HOME": str(home), "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("FEDGPU_ZYGOTE", None)
    return env


def median(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def machine() -> str:
    """One line on where the numbers come from."""
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    try:  # NVML, not torch: the benchmark processes themselves stay torch-free
        import pynvml

        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
        gpu = f"{count}x {pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))}" if count else "no GPU"
    except Exception:  # noqa: BLE001 - no driver, no library
        gpu = "no GPU"
    return (
        f"{platform.node() or 'host'}: {os.cpu_count()} CPUs, {memory_gib:.0f} GiB, {gpu}; "
        f"Python {platform.python_version()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def report(name: str, title: str, body: str, raw: dict[str, Any], machine_line: str | None = None) -> None:
    """Print the markdown and write it, with the raw samples, under results/."""
    text = (f"# {title}\n\n{machine_line or machine()}\n\n"
            f"Command: `{' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}`\n\n{body}\n")
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text(text)
    (RESULTS / f"{name}.json").write_text(json.dumps(raw, indent=2, default=str))
