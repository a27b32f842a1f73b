"""Writing a run's files so that a crash or a full disk leaves them whole or absent.

A file is written beside its final name and renamed over it, so a reader
sees the old version or the new one, never half of one; a write that fails
removes what it left and raises ``OutputError`` naming the file and the error.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from fedgpu.errors import FedgpuError


class OutputError(FedgpuError):
    """A file could not be written (disk full, directory gone or read-only)."""

    def __init__(self, path: str | os.PathLike, error: OSError) -> None:
        self.path = str(path)
        self.strerror = error.strerror or str(error)
        super().__init__(f"cannot write {self.path}: {self.strerror}")


def write_atomic(path: str | os.PathLike, data: bytes | str, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` in one step; OutputError if it cannot be written."""
    path = os.fspath(path)
    directory, name = os.path.split(os.path.abspath(path))
    payload = data.encode() if isinstance(data, str) else data
    temp = None
    try:
        fd, temp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as out:
            out.write(payload)
        os.chmod(temp, mode)
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
        with open(path, "a", newline="") as out:
            out.write(line)
    except OSError as err:
        raise OutputError(path, err) from None
