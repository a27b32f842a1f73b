"""One child for one piece of work: placed on a GPU, announced, measured.

Shared by every place that runs work in a child on a GPU (the client nodes'
task runner, the ServerApp's own evaluation, ``fedgpu bench-models``):
reserve a GPU with room (waiting if none has it), start the child there, tell
the memory monitor which pid does what (``child-start``/``child-end`` events),
and hand the child's measured GPU peak back to the placer to learn from.
Nothing here is Flower's.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from fedgpu.isolation import IsolationError, Isolator, Outcome
from fedgpu.monitor.events import emit
from fedgpu.nvml.devices import MIB
from fedgpu.nvml.placement import AdmissionTimedOut, GpuPlacer, Placement


def run_child(
    isolator: Isolator,
    placer: GpuPlacer | None,
    fn: Callable[..., Any],
    args: tuple,
    *,
    key: str,
    who: dict[str, Any],
    role: str,
    timeout: float | None = None,
    run_dir: str | None = None,
) -> tuple[Outcome, Placement | None]:
    """``isolator.run(fn, args)`` on a GPU ``placer`` reserved for ``key`` (none without a placer).

    ``who`` (client, round, message... or model) and ``role`` name the child
    in the monitor's events under ``run_dir``. Returns the outcome and the
    placement it ran under; raises what the Isolator raises, or
    AdmissionTimedOut if no GPU had room in time.
    """
    placement = None
    if placer is not None:
        asked = time.monotonic()
        try:
            placement = placer.acquire(key)
        except AdmissionTimedOut:
            emit("admission-wait", run_dir, **who, seconds=time.monotonic() - asked, timed_out=True)
            raise
        if placement.waited_seconds:
            emit("admission-wait", run_dir, **who, seconds=placement.waited_seconds, gpu=placement.gpu)

    def started(pid: int) -> None:
        if placement is not None:
            placer.bind(placement, pid)  # type: ignore[union-attr]
        gpu = None if placement is None else placement.gpu
        emit("child-start", run_dir, pid=pid, role=role, parent_pid=os.getpid(), gpu=gpu, **who)

    pid, peak, rss_mib = None, 0, 0.0
    try:
        env = None if placement is None else placement.env()
        outcome = isolator.run(fn, args, timeout=timeout, env=env, on_start=started)
        pid, peak, rss_mib = outcome.pid, outcome.gpu_peak_bytes, outcome.max_rss_kib / 1024
        return outcome, placement
    except IsolationError as err:
        pid = err.pid
        raise
    finally:
        if placement is not None:
            placer.release(placement, peak)  # type: ignore[union-attr]
        if pid is not None:
            # Its own peaks: a child shorter than the monitor's sampling interval is seen here.
            emit("child-end", run_dir, pid=pid, role=role, gpu_peak_mib=round(peak / MIB, 1),
                 rss_peak_mib=round(rss_mib, 1), **who)
