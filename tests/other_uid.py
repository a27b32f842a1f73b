"""Another local user, for the tests of who can reach a run: ``nobody``, with a Python of its own.

The other uid must not borrow our interpreter (a venv's may sit in a home it
cannot read): it runs the system's ``python3`` with a copy of Flower and what
Flower needs, in a folder every user can read, unless it can read our
site-packages already. Tests that need it run as root (as CI does) and are
skipped, with the reason, elsewhere.
"""

from __future__ import annotations

import atexit
import importlib.metadata
import os
import pwd
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest

OTHER_USER = "nobody"
SYSTEM_PYTHONS = ("/usr/bin/python3", "/usr/local/bin/python3")
HOSTILE_APP = Path(__file__).resolve().parent / "hostile"


def _as_other(uid: int, gid: int) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"]


def _same_minor(python: str) -> bool:
    done = subprocess.run([python, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True, text=True)
    return done.returncode == 0 and done.stdout.strip() == str(tuple(sys.version_info[:2]))


def _closure(name: str) -> set[str]:
    """The distributions ``name`` needs, itself included (extras left out)."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        current = todo.pop()
        key = current.lower().replace("_", "-")
        if key in seen:
            continue
        try:
            dist = importlib.metadata.distribution(current)
        except importlib.metadata.PackageNotFoundError:
            continue
        seen.add(key)
        for requirement in dist.requires or []:
            if "extra ==" in requirement:
                continue
            todo.append(re.split(r"[ ;<>=!~\[(]", requirement, maxsplit=1)[0])
    return seen


def _copy_flower(target: Path) -> None:
    """Flower and what it needs, readable by every user, under ``target``."""
    target.chmod(0o755)
    for name in _closure("flwr"):
        dist = importlib.metadata.distribution(name)
        for file in dist.files or []:
            # A RECORD also lists scripts as ../../../bin/NAME: outside the copy, shared by every run; not needed
            # to import Flower.
            if ".." in file.parts:
                continue
            source = Path(str(file.locate()))
            if not source.is_file():
                continue
            destination = target / file
            for folder in reversed(destination.relative_to(target).parents[:-1]):
                if not (target / folder).is_dir():
                    (target / folder).mkdir(mode=0o755)
                    (target / folder).chmod(0o755)  # whatever the umask
            if source.stat().st_mode & 0o004:  # readable by others: a link will do
                try:
                    os.link(source, destination)
                    continue
                except OSError:
                    pass
            shutil.copyfile(source, destination)
            destination.chmod(0o644)


class OtherUser:
    """Runs commands as ``nobody`` with the system's Python and Flower importable."""

    def __init__(self, home: Path) -> None:
        entry = pwd.getpwnam(OTHER_USER)
        self.uid, self.gid = entry.pw_uid, entry.pw_gid
        self.home = home
        self.python = next((p for p in SYSTEM_PYTHONS if os.path.exists(p) and _same_minor(p)), None)
        if self.python is None:
            pytest.skip(f"no system python3 of version {sys.version_info[0]}.{sys.version_info[1]} "
                        "for another uid to use")
        self.site = sysconfig.get_paths()["purelib"]
        if not self._can_import(self.site):
            copy = Path(tempfile.mkdtemp(prefix="other-uid-site-", dir=home))
            _copy_flower(copy)
            self.site = str(copy)
            if not self._can_import(self.site):
                pytest.skip(f"{OTHER_USER} cannot import Flower even from a copy in {copy}")

    def _can_import(self, site: str) -> bool:
        done = self.run(["-c", "import flwr.cli.app"], site=site, timeout=120)
        return done.returncode == 0

    def env(self, site: str | None = None, **extra: str) -> dict[str, str]:
        return {"PATH": "/usr/bin:/bin", "HOME": str(self.home), "PYTHONPATH": site or self.site,
                "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", **extra}

    def run(self, args: list[str], *, site: str | None = None, timeout: float = 120,
            **env: str) -> subprocess.CompletedProcess:
        """``python3 ARGS`` as the other user, in its home."""
        return subprocess.run([*_as_other(self.uid, self.gid), self.python, *args], env=self.env(site, **env),
                              cwd=self.home, capture_output=True, text=True, timeout=timeout)


    def submit(self, port: int, marker: Path, ca_file: Path | None = None,
               attempts: int = 3) -> subprocess.CompletedProcess:
        """`flwr run` of this user's own app (tests/hostile) against the SuperLink on 127.0.0.1:port.

        A connection that failed (a loaded host) is tried again, up to ``attempts``
        times; the last answer is returned."""
        for _ in range(attempts):
            done = self._submit(port, marker, ca_file)
            if "unavailable" not in done.stdout + done.stderr:
                break
        return done

    def _submit(self, port: int, marker: Path, ca_file: Path | None) -> subprocess.CompletedProcess:
        home = self.home / f"flwr-{port}"
        home.mkdir(exist_ok=True)
        security = f'root-certificates = "{ca_file}"' if ca_file else "insecure = true"
        (home / "config.toml").write_text(f'[superlink.victim]\naddress = "127.0.0.1:{port}"\n{security}\n')
        for path in (home, home / "config.toml"):
            os.chown(path, self.uid, self.gid)
        return self.run(["-c", "from flwr.cli.app import app; app()", "run", str(self.home / "app"), "victim",
                         "--run-config", f'marker="{marker}"'], FLWR_HOME=str(home))

    def post(self, url: str) -> str:
        """A raw POST, certificates unchecked: the status it got ("200", "403"), or why it got none."""
        script = ("import ssl, sys, urllib.request, urllib.error\n"
                  "try:\n"
                  "    urllib.request.urlopen(urllib.request.Request(sys.argv[1], data=b'', method='POST'), timeout=10,"
                  " context=ssl._create_unverified_context())\n"
                  "    print('200')\n"
                  "except urllib.error.HTTPError as err:\n"
                  "    print(err.code)\n"
                  "except OSError as err:\n"
                  "    print('no answer', err)\n")
        return self.run(["-c", script, url]).stdout.strip()


def other_user(tmp_path_factory: pytest.TempPathFactory) -> OtherUser:
    """A fresh home for ``nobody`` (0755 path to it) and its Python; skips where that cannot be."""
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another uid (CI runs as root)")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    try:
        pwd.getpwnam(OTHER_USER)
    except KeyError:
        pytest.skip(f"no user {OTHER_USER!r} on this host")
    # Not under pytest's own temporary folder: that one is 0700, closed to the other uid.
    base = Path(tempfile.mkdtemp(prefix="other-uid-"))
    atexit.register(shutil.rmtree, base, True)
    base.chmod(0o755)
    home = base / "home"
    home.mkdir()
    entry = pwd.getpwnam(OTHER_USER)
    os.chown(home, entry.pw_uid, entry.pw_gid)
    user = OtherUser(home)
    shutil.copytree(HOSTILE_APP, home / "app")
    for path in [home / "app", *(home / "app").rglob("*")]:
        os.chown(path, entry.pw_uid, entry.pw_gid)
    return user
