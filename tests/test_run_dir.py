"""Run directories are the owner's: planted links and other users' directories are refused before anything starts."""

from __future__ import annotations

import os
import pwd
import stat
import subprocess
from pathlib import Path

import pytest

from fedgpu.errors import BadInput
from fedgpu.output import OutputError, append_line, open_output, write_atomic
from fedgpu.run_dir import prepare_run_dir

from helpers import FEDGPU

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make files of another uid (CI runs as root)")


def nobody() -> tuple[int, int]:
    entry = pwd.getpwnam("nobody")
    return entry.pw_uid, entry.pw_gid


def fedgpu_run(run_dir: Path, *more: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(FEDGPU), "run", "2", "--run-dir", str(run_dir), *more], capture_output=True, text=True,
                          timeout=120)


def shared_folder(tmp_path: Path) -> Path:
    """A folder like /tmp: everyone may create entries, the sticky bit keeps them theirs."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    return shared


def secret(tmp_path: Path) -> Path:
    """A 0600 file of the owner's that a planted link points at."""
    path = tmp_path / "secret"
    path.write_text("the owner's own\n")
    path.chmod(0o600)
    return path


@needs_root
def test_a_directory_planted_by_another_user_is_refused_and_its_links_followed_nowhere(tmp_path: Path) -> None:
    target = secret(tmp_path)
    planted = shared_folder(tmp_path) / "X"
    planted.mkdir()
    for name in ("memory.csv", "server.log"):
        os.symlink(target, planted / name)
        os.lchown(planted / name, *nobody())
    os.chown(planted, *nobody())
    done = fedgpu_run(planted)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.count("\n") == 1 and "belongs to nobody" in done.stderr, done.stderr
    assert target.read_text() == "the owner's own\n" and stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(p.name for p in planted.iterdir()) == ["memory.csv", "server.log"]  # nothing written there


@needs_root
def test_links_planted_in_a_directory_of_ours_that_others_can_write_are_refused(tmp_path: Path) -> None:
    target = secret(tmp_path)
    ours = shared_folder(tmp_path) / "X"
    ours.mkdir()
    ours.chmod(0o1777)  # sticky: others may add entries, not replace ours
    os.symlink(target, ours / "memory.csv")
    os.lchown(ours / "memory.csv", *nobody())
    done = fedgpu_run(ours)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "holds memory.csv, which belongs to nobody" in done.stderr, done.stderr
    assert target.read_text() == "the owner's own\n"
    assert stat.S_IMODE(ours.stat().st_mode) == 0o700  # closed before its entries were read


def test_a_directory_every_user_may_write_without_the_sticky_bit_is_refused(tmp_path: Path) -> None:
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    done = fedgpu_run(open_dir)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "writable by every user" in done.stderr


def test_a_link_as_the_run_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    with pytest.raises(BadInput, match="is a symbolic link"):
        prepare_run_dir(tmp_path / "link")
    (tmp_path / "file").write_text("")
    with pytest.raises(BadInput, match="is not a directory"):
        prepare_run_dir(tmp_path / "file")


def test_a_directory_that_holds_a_run_is_refused_unless_forced(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    prepare_run_dir(run_dir)
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    for name in ("report.json", "server.log", "client-0.log"):
        (run_dir / name).write_text("an earlier run\n")
    (run_dir / "flwr-home").mkdir()
    (run_dir / "notes.txt").write_text("the user's own\n")
    with pytest.raises(BadInput, match=r"already holds a run \(client-0.log, flwr-home, report.json\).*--force"):
        prepare_run_dir(run_dir)
    prepare_run_dir(run_dir, ours=True)  # the launcher's own logs: this run's
    assert (run_dir / "server.log").exists()
    prepare_run_dir(run_dir, force=True)
    assert sorted(p.name for p in run_dir.iterdir()) == ["notes.txt"]  # only the earlier run's outputs went


def test_a_shared_umask_shares_and_the_default_keeps_outputs_private(tmp_path: Path) -> None:
    prepare_run_dir(tmp_path / "shared", umask=0o027)
    assert stat.S_IMODE((tmp_path / "shared").stat().st_mode) == 0o750
    done = subprocess.run([str(FEDGPU), "run", "--umask", "9x", "--check"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "octal umask" in done.stderr, done.stderr
    old = os.umask(0o077)
    try:
        write_atomic(tmp_path / "report.json", "{}")
        append_line(tmp_path / "metrics.csv", "a,b\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "report.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "metrics.csv").stat().st_mode) == 0o600


def test_outputs_are_never_opened_through_a_link(tmp_path: Path) -> None:
    target = secret(tmp_path)
    os.symlink(target, tmp_path / "server.log")
    with pytest.raises(OutputError, match="server.log"):
        open_output(tmp_path / "server.log", "ab")
    with pytest.raises(OutputError):
        append_line(tmp_path / "server.log", "x\n")
    os.mkfifo(tmp_path / "memory.csv")
    with pytest.raises(OutputError, match="memory.csv"):
        open_output(tmp_path / "memory.csv", "w")  # at once: a FIFO with no reader would block an open for writing
    write_atomic(tmp_path / "server.log", "replaced\n")  # a rename replaces the link itself
    assert target.read_text() == "the owner's own\n" and not (tmp_path / "server.log").is_symlink()


@needs_root
def test_an_output_file_of_another_uid_is_not_written(tmp_path: Path) -> None:
    theirs = tmp_path / "events.log"
    theirs.write_text("")
    theirs.chmod(0o666)
    os.chown(theirs, *nobody())
    with pytest.raises(OutputError, match="not a regular file of ours"):
        open_output(theirs, "a")
    assert theirs.read_text() == ""
