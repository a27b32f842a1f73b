"""Unix socket paths of any length: a long one is reached through its directory's descriptor.

A Unix socket address holds at most 107 bytes of path, and a private directory
under a long ``$TMPDIR`` (a job's scratch folder, a test's temporary tree)
overflows it. Opened with ``O_PATH``, the directory is ``/proc/self/fd/N``, a
short path the kernel resolves to the same file: bind, connect and sendto take
it, thread-safely (unlike a ``chdir``). Short paths are used as they are.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

MAX_UNIX_PATH = 107  # sizeof(sun_path) less the terminating NUL, on Linux


@contextmanager
def unix_address(path: str) -> Iterator[str]:
    """``path`` as a Unix socket address, valid inside the ``with``; OSError if its directory cannot be opened."""
    if len(os.fsencode(path)) <= MAX_UNIX_PATH:
        yield path
        return
    directory, name = os.path.split(path)
    descriptor = os.open(directory or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{descriptor}/{name}"
    finally:
        os.close(descriptor)
