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
from pathlib import Path
from typing import Any, Iterable, Sequence

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 1024 * 1024


def child_pids(pid: int) -> list[int]:
    """The children of ``pid`` (forked by any of its threads); [] once it is gone."""
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            found += [int(child) for child in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    except OSError:
        pass
    return found


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
    text = f"# {title}\n\n{machine_line or machine()}\n\nCommand: `{' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}`\n\n{body}\n"
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text(text)
    (RESULTS / f"{name}.json").write_text(json.dumps(raw, indent=2, default=str))
