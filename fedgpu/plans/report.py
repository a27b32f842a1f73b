"""``fedgpu report``: its run directories checked and read into the summaries to show."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def plan_report(run_dirs: tuple[str, ...], warn: Callable[[str], Any]) -> list[tuple[str, dict[str, Any]]]:
    """(name, summary) for each run directory; BadInput where nothing can be reported.

    Damaged files are a warning (the table is made from what is left) or a
    refusal, in one line each: files that are not regular files (a symbolic
    link, a FIFO, a device) are not read, JSON nested too deeply or too large
    is not parsed.
    """
    import os

    from fedgpu.errors import BadInput
    from fedgpu.monitor.memory import TIMELINE_FILE
    from fedgpu.monitor.report import DAMAGED, one_line, why_not_reportable
    from fedgpu.monitor.summary import SUMMARY_FILE, load_summary_checked

    if len(run_dirs) > 2:
        raise BadInput(f"report takes one or two run directories, got {len(run_dirs)}")
    runs = []
    for run_dir in run_dirs:
        # lexists: a symbolic link or a FIFO in their place is said by name below, not taken for "no file".
        if not any(os.path.lexists(os.path.join(run_dir, name)) for name in (SUMMARY_FILE, TIMELINE_FILE)):
            raise BadInput(f"{run_dir}: not a run directory (no {SUMMARY_FILE} or {TIMELINE_FILE})")
        try:
            summary, problems = load_summary_checked(run_dir, check=why_not_reportable)
            why_not = None if summary is None else why_not_reportable(summary)
        except DAMAGED as err:  # events or samples that summarise cannot use
            summary, problems, why_not = None, [], one_line(err)
        if why_not is not None:
            raise BadInput(f"{run_dir}: nothing to report: {TIMELINE_FILE} and events do not make a summary "
                           f"({why_not})")
        if summary is None:
            raise BadInput(f"{run_dir}: nothing to report: {'; '.join(problems)}")
        for problem in problems:
            warn(f"{run_dir}: {problem}")
        runs.append((run_dir, summary))
    return runs
