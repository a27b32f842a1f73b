"""``memory.png``: memory over time, one line per GPU and one for the host, rounds shaded."""

from __future__ import annotations

import io
import math
import os
from typing import Any

from fedgpu.monitor.summary import Timeline
from fedgpu.output import write_atomic

PLOT_FILE = "memory.png"


def write_plot(run_dir: str, summary: dict[str, Any], timeline: Timeline | None = None) -> str:
    # A Figure on the Agg canvas, not pyplot: no display, no GUI toolkit, no global figure registry in a server.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    timeline = timeline or Timeline.load(run_dir)
    gpu, host = timeline.gpu, timeline.host
    times = [m.t for m in gpu + host]
    origin = min(times) if times else 0.0
    figure = Figure(figsize=(11, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    for index in sorted(gpu[0].per_gpu, key=int) if gpu else []:
        axes.plot([m.t - origin for m in gpu], [m.per_gpu.get(index, 0.0) for m in gpu], lw=1.2,
                  label=f"GPU {index} used")
    if gpu:
        axes.plot([m.t - origin for m in gpu], [m.ours for m in gpu], lw=1.0, ls="--",
                  label="GPU, this run's processes")
    axes.plot([m.t - origin for m in host], [m.total for m in host], lw=1.2, color="black",
              label="host RSS, this run's processes")
    for rnd, (start, end) in sorted(timeline.rounds().items()):
        if end == math.inf:  # a round that never ended: shade to the last sample
            end = max(times, default=start)
        axes.axvspan(start - origin, end - origin, color="tab:blue" if rnd % 2 else "tab:orange", alpha=0.12, lw=0)
        axes.text((start + end) / 2 - origin, 1.0, f"r{rnd}", transform=axes.get_xaxis_transform(), ha="center",
                  va="bottom", fontsize=8)
    axes.set_xlabel("seconds since the monitor started")
    axes.set_ylabel("MiB")
    title = "memory per GPU and host, rounds shaded"
    if summary.get("note"):
        title = summary["note"]
    axes.set_title(title, fontsize=10, pad=14)
    axes.legend(loc="upper left", fontsize=8)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    path = os.path.join(run_dir, PLOT_FILE)
    image = io.BytesIO()
    figure.savefig(image, format="png")
    write_atomic(path, image.getvalue())
    return path
