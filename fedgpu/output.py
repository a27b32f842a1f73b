"""Writing a run's files so that a crash or a full disk leaves them whole or absent.

A file is written beside its final name and renamed over it, so a reader
sees the old version or the new one, never half of one; a write that fails
removes what it left and raises ``OutputError`` naming the file and the error.
No output follows a link or writes into a file of another uid: files kept open
(logs, the sample stream) are opened with ``O_NOFOLLOW`` and checked to be our
own regular files. Modes follow the process's umask (fedgpu sets 077 for a run
unless asked to share): 0600 files in a 0700 run directory.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import stat
import tempfile
from collections.abc import Iterable
from typing import IO, Any

from fedgpu.errors import FedgpuError


class OutputError(FedgpuError):
    """A file could not be written (disk full, directory gone or read-only)."""

    def __init__(self, path: str | os.PathLike, error: OSError) -> None:
        self.path = str(path)
        self.strerror = error.strerror or str(error)
        super().__init__(f"cannot write {self.path}: {self.strerror}")


def current_umask() -> int:
    """This process's umask, read without changing it (os.umask would, for a moment, in every thread)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def open_output(path: str | os.PathLike, mode: str = "a") -> IO[Any]:
    """Open one of our outputs for writing (``mode``: "a", "w", "ab" or "wb"), never through a link.

    The file is created with the umask's mode, or must already be a regular
    file of ours; OutputError otherwise.
    """
    # O_NONBLOCK: a FIFO planted under an output's name fails at once instead of blocking us.
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as err:
        raise OutputError(path, err) from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
        os.close(fd)
        raise OutputError(path, OSError(0, "not a regular file of ours"))
    # Only now, on our own file: truncating first would empty whatever a name pointed at.
    os.set_blocking(fd, True)
    if mode.startswith("a"):
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)
    else:
        os.ftruncate(fd, 0)
    return os.fdopen(fd, mode, newline="") if "b" not in mode else os.fdopen(fd, mode)


def write_atomic(path: str | os.PathLike, data: bytes | str, mode: int | None = None) -> None:
    """Replace ``path`` with ``data`` in one step; OutputError if it cannot be written."""
    path = os.fspath(path)
    directory, name = os.path.split(os.path.abspath(path))
    payload = data.encode() if isinstance(data, str) else data
    temp = None
    try:
        fd, temp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as out:
            out.write(payload)
        os.chmod(temp, 0o666 & ~current_umask() if mode is None else mode)
        os.replace(temp, path)
        temp = None
    except OSError as err:
        raise OutputError(path, err) from None
    finally:
        if temp is not None:
            try:
                os.unlink(temp)
            except OSError:
                pass


def write_json(path: str | os.PathLike, value: Any, **dumps: Any) -> None:
    write_atomic(path, json.dumps(value, indent=2, **dumps))


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line; OutputError if it cannot be written."""
    try:
        with open_output(path, "a") as out:
            out.write(line)
    except OSError as err:
        raise OutputError(path, err) from None


def csv_line(values: Iterable[Any]) -> str:
    """One CSV row, as metrics.csv files are written a line at a time."""
    line = io.StringIO()
    csv.writer(line).writerow(list(values))
    return line.getvalue()
