"""What happened when, for the memory monitor: a run's ``events.jsonl``.

Rounds start and end (ServerApp), client nodes start, children start and end
(task runner, ServerApp evaluation), admission waits. Each event is one line
appended with a single ``write`` (atomic for lines this short), so every
process of a run can write the same file. The monitor maps the pids it
samples to a client, round and message through these events. Writing an
event must never break a run: errors are ignored.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from fedgpu.names import RUN_DIR_ENV

EVENTS_FILE = "events.jsonl"


def emit(event: str, run_dir: str | None = None, **fields: Any) -> None:
    """Append one event to the run's events file (no-op outside a run)."""
    run_dir = run_dir or os.environ.get(RUN_DIR_ENV)
    if not run_dir:
        return
    line = json.dumps({"t": time.time(), "event": event, **fields}, default=str) + "\n"
    try:
        fd = os.open(os.path.join(run_dir, EVENTS_FILE),
                     os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
    except OSError:
        pass


class EventsTail:
    """Reads the events appended since the last call (a partial last line waits)."""

    def __init__(self, run_dir: str) -> None:
        self.path = os.path.join(run_dir, EVENTS_FILE)
        self._offset = 0
        self._partial = b""

    def read_new(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self._offset)
                data = handle.read()
        except OSError:
            return []
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        events = []
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if _well_formed(event):
                events.append(event)
        return events


def _well_formed(event: Any) -> bool:
    """An event as ``emit`` writes it: a time, a name, and a whole round number where it names a round."""
    if (not isinstance(event, dict) or not isinstance(event.get("t"), (int, float))
            or not isinstance(event.get("event"), str)):
        return False
    return event["event"] not in ("round-start", "round-end") or isinstance(event.get("round"), int)


def read_events(run_dir: str, problems: list[str] | None = None) -> list[dict[str, Any]]:
    """The run's events, read without trusting the file (``run_files``).

    Lines that are not events (cut short, not JSON, nested too deeply) are skipped;
    a file that is not read (a link, a FIFO, too large) is said in ``problems``.
    """
    from fedgpu.monitor.run_files import MAX_LINES_BYTES, NotRead, lines, open_run_file

    try:
        handle = open_run_file(os.path.join(run_dir, EVENTS_FILE), MAX_LINES_BYTES)
    except FileNotFoundError:
        return []
    except (NotRead, OSError) as err:
        if problems is not None:
            problems.append(f"{EVENTS_FILE}: not read: {err}")
        return []
    events = []
    with handle:
        for line in lines(handle, [0]):
            if not line.endswith(b"\n"):
                continue  # a partial last line: still being written
            try:
                event = json.loads(line)
            except (ValueError, RecursionError):
                continue
            if _well_formed(event):
                events.append(event)
    return events
