"""Reading a run's files without trusting them.

A run directory can be damaged, or planted: a reader must never follow a link,
wait on a FIFO, read a device, load without bound or recurse without end. Every
reader of a run's files (``fedgpu report``, the end-of-run summary, an app's
report) opens them here.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Iterator
from typing import IO, Any

# What is read of a run's files: a summary of thousands of rounds is a few MiB, a
# day's timeline some hundreds; no line of ours comes near a MiB.
MAX_JSON_BYTES = 64 * 1024 * 1024
MAX_LINES_BYTES = 4 * 1024 * 1024 * 1024
MAX_LINE_BYTES = 1024 * 1024


class NotRead(Exception):
    """A run's file that is not read: the one line says why."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "a file of another kind"


def open_run_file(path: str, limit: int) -> IO[bytes]:
    """A run's file, opened to read, if it is a regular file of at most ``limit`` bytes.

    The file is opened without following a symbolic link or waiting for a
    FIFO's writer (O_NOFOLLOW, O_NONBLOCK) and checked on what was opened
    (fstat): anything else is a NotRead that says what it is. A file that
    does not exist is a FileNotFoundError.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise
    except OSError as err:
        try:
            what = _kind(os.lstat(path).st_mode)
        except OSError:
            what = ""
        if err.errno == errno.ELOOP or what == "a symbolic link":
            raise NotRead("a symbolic link, not followed") from None
        raise NotRead(f"{what}, not a regular file" if what else (err.strerror or str(err))) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotRead(f"{_kind(info.st_mode)}, not a regular file")
        if info.st_size > limit:
            raise NotRead(f"{info.st_size} bytes, more than the {limit} read of it")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_json_file(path: str, limit: int = MAX_JSON_BYTES) -> Any:
    """A run's JSON file (see ``open_run_file``): NotRead, or ValueError if it does not parse.

    Nesting too deep to parse is a ValueError too, not a RecursionError.
    """
    with open_run_file(path, limit) as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:  # it grew since it was opened
        raise NotRead(f"more than the {limit} bytes read of it")
    try:
        return json.loads(data.decode(errors="replace"))
    except RecursionError:
        raise ValueError("nested too deeply to read") from None


def lines(handle: IO[bytes], overlong: list[int], limit: int = MAX_LINES_BYTES) -> Iterator[bytes]:
    """The file's lines (a last one may lack its newline), ``limit`` bytes in all.

    A line longer than MAX_LINE_BYTES is passed over and counted in ``overlong[0]``.
    """
    left = limit
    while left > 0:
        line = handle.readline(min(MAX_LINE_BYTES + 1, left))
        if not line:
            return
        left -= len(line)
        if len(line) > MAX_LINE_BYTES:
            overlong[0] += 1
            while line and not line.endswith(b"\n") and left > 0:  # the rest of it
                line = handle.readline(min(MAX_LINE_BYTES, left))
                left -= len(line)
            continue
        yield line


