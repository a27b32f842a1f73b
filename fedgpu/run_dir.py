"""The run directory: the owner's, private, and never another run's by accident.

A run writes its logs, reports and model into one directory. On a shared host
that directory may sit in a folder others can write to (``/tmp``), so before
anything is written:

- a path that is a symbolic link, not a directory, or another uid's, is refused;
- a directory that others may write to without the sticky bit is refused
  (anyone could swap its entries);
- its mode is set from the run's umask (0700 by default) before its entries are
  looked at, so nobody else can add one afterwards; an entry that is not the
  owner's is then refused;
- a directory that holds a run already is refused, unless ``force``: then that
  run's outputs are removed first (never following a link).

Every output is then opened with ``O_NOFOLLOW`` (``fedgpu.output``).
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import tempfile
from pathlib import Path

from fedgpu.errors import BadInput

# What a run leaves behind; any one of them means the directory holds a run.
RUN_FILES = (
    "report.json", "events.jsonl", "memory.csv", "memory.json", "memory.png", "metrics.csv", "model.npz",
    "server.log", "superlink.log", "serverapp.log", "zygote.log",
)
RUN_DIRS = ("flwr-home", "app", "certs")
DEFAULT_UMASK = 0o077


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _is_run_entry(name: str) -> bool:
    return name in RUN_FILES or name in RUN_DIRS or (name.startswith("client-") and name.endswith(".log"))


def prepare_run_dir(path: Path, *, umask: int = DEFAULT_UMASK, force: bool = False, ours: bool = False) -> None:
    """Create ``path`` or make an existing one safe for a run; BadInput names the first problem.

    ``ours``: the directory was prepared by this run's own launcher (its logs
    are already there).
    """
    mode = 0o777 & ~umask
    where = f"run directory {path}"
    try:
        try:
            os.mkdir(path, mode)
            created = True
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.mkdir(path, mode)
            created = True
        except FileExistsError:
            created = False
        info = os.lstat(path)
    except OSError as err:
        raise BadInput(f"{where} is not writable: {err.strerror or err}") from None
    if stat.S_ISLNK(info.st_mode):
        raise BadInput(f"{where} is a symbolic link; give the directory itself")
    if not stat.S_ISDIR(info.st_mode):
        raise BadInput(f"{where} is not a directory")
    if info.st_uid != os.geteuid():
        raise BadInput(f"{where} belongs to {_user(info.st_uid)}, not to you")
    if info.st_mode & stat.S_IWOTH and not info.st_mode & stat.S_ISVTX:
        raise BadInput(f"{where} is writable by every user; use a directory of your own")
    try:
        os.chmod(path, mode)  # from here on nobody else can add an entry
        names = sorted(os.listdir(path))
    except OSError as err:
        raise BadInput(f"{where} cannot be made private: {err.strerror or err}") from None
    for name in names:
        entry = os.lstat(path / name)
        if entry.st_uid != os.geteuid():
            raise BadInput(f"{where} holds {name}, which belongs to {_user(entry.st_uid)}; use a directory of your own")
    previous = [name for name in names if _is_run_entry(name)]
    if previous and not created and not ours:
        if not force:
            raise BadInput(f"{where} already holds a run ({', '.join(previous[:3])}); "
                           "give --force to replace its outputs, or another --run-dir")
        for name in previous:
            entry = path / name
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)  # fd-based: never follows a link inside
            else:
                entry.unlink()
    try:
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as err:
        raise BadInput(f"{where} is not writable: {err.strerror or err}") from None


def parse_umask(text: str) -> int:
    """``--umask`` as octal text (077, 0o022); ValueError if it is not one."""
    value = int(text, 8)
    if not 0 <= value <= 0o777:
        raise ValueError(text)
    return value
