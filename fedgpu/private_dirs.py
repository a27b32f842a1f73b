"""A run's private temporary directory, and the sweep of those whose owner died.

A run keeps its sockets and helper scripts (the zygote's socket, the nodes'
doorbells, the ServerApp wrapper, the nodes' Flower homes) in one 0700
directory in the temporary folder, named ``fedgpu-KIND.XXXXXXXX`` and holding
an ``owner`` file: the pid and start time of the process that removes it when
it ends. A process killed with SIGKILL cannot; the next fedgpu process to
start removes every such directory of this uid whose owner is provably dead
(no process with that pid and start time).
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile

PREFIX = "fedgpu-"
OWNER_FILE = "owner"


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22); None if there is none."""
    try:
        with open(f"/proc/{pid}/stat") as stat_file:
            text = stat_file.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    return text[text.rindex(")") + 2 :].split()[19]


def make_private_dir(kind: str, owner_pid: int | None = None) -> str:
    """A new 0700 directory ``fedgpu-KIND.*`` in the temporary folder, owned by ``owner_pid`` (default: us)."""
    pid = os.getpid() if owner_pid is None else owner_pid
    directory = tempfile.mkdtemp(prefix=f"{PREFIX}{kind}.")
    fd = os.open(os.path.join(directory, OWNER_FILE), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as owner:
        owner.write(f"{pid} {start_time(pid)}\n")
    return directory


def subdir(parent: str, name: str) -> str:
    """``parent/name``, created 0700 if missing; a link or another uid's entry there is refused (OSError)."""
    path = os.path.join(parent, name)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        info = os.lstat(path)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
            raise OSError(f"{path} is not a directory of ours") from None
    return path


def _owner_alive(directory: str) -> bool:
    try:
        fd = os.open(os.path.join(directory, OWNER_FILE), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        with os.fdopen(fd) as owner:
            pid_text, _, started = owner.read(64).strip().partition(" ")
        pid = int(pid_text)
    except (OSError, ValueError):
        return True  # no readable owner: not provably dead, left alone
    return start_time(pid) == started


def sweep_dead(temp_dir: str | None = None) -> list[str]:
    """Remove this uid's private directories whose owner is dead; the paths removed."""
    temp_dir = temp_dir or tempfile.gettempdir()
    removed = []
    try:
        names = os.listdir(temp_dir)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(PREFIX):
            continue
        path = os.path.join(temp_dir, name)
        try:
            info = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or _owner_alive(path):
            continue
        shutil.rmtree(path, ignore_errors=True)  # never follows links (fd-based on Linux)
        removed.append(path)
    return removed


def remove(directory: str | None) -> None:
    if directory:
        shutil.rmtree(directory, ignore_errors=True)
