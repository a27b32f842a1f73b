"""A run's files when the disk fills up: one line naming the file, a failed report, no debris, nothing left running."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from helpers import cleaned_up, processes_with_env, start_run_sh, wait_for

pytestmark = pytest.mark.e2e


def _temp_files(run_dir: Path) -> list[str]:
    return [str(path) for path in run_dir.rglob("*.tmp")]


def test_a_metrics_file_swapped_for_a_link_fails_the_run_in_one_line(tmp_path: Path) -> None:
    """metrics.csv is appended to after each round; here it is replaced by a link mid-run: nothing is written
    through it, and the run fails in one line (a full disk: the tmpfs test below)."""
    run_dir = tmp_path / "run"
    target = tmp_path / "elsewhere.csv"
    target.write_text("not the run's\n")
    proc = start_run_sh(["2", "2", "2", "3", "--run-dir", str(run_dir)])
    with cleaned_up(proc, run_dir):
        metrics = run_dir / "metrics.csv"
        assert wait_for(metrics.exists, timeout=180, interval=0.05), "the ServerApp never started"
        link = run_dir / "link"
        link.symlink_to(target)
        os.replace(link, metrics)  # before round 1 ends: its row cannot be written
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 1, out + err
        assert target.read_text() == "not the run's\n"
        line = f"cannot write {metrics}: Too many levels of symbolic links"
        assert f"[fedgpu] run failed: {line}" in out, out + err
        report = json.loads((run_dir / "report.json").read_text())
        assert (report["status"] == "failed"
                and report["failure"] == {"kind": "output", "detail": line, "path": str(metrics)})
        assert not _temp_files(run_dir)
        assert wait_for(lambda: not processes_with_env("FEDGPU_RUN_DIR", str(run_dir)), timeout=15)


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 150 KiB file system (tmpfs), the run directory of a run that outgrows it."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=150k", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_run_directory_fails_the_run_in_one_line_and_leaves_no_debris(small_disk: Path) -> None:
    run_dir = small_disk / "run"
    proc = start_run_sh(["2", "2", "2", "50", "--run-dir", str(run_dir)])
    with cleaned_up(proc, run_dir):
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 1, out + err
        # Whichever file met the full disk first is named, with the error.
        found = re.findall(rf"cannot write ({re.escape(str(run_dir))}/\S+): No space left on device", out + err)
        assert found, out + err
        assert not _temp_files(run_dir)
        assert wait_for(lambda: not processes_with_env("FEDGPU_RUN_DIR", str(run_dir)), timeout=15)
