"""`fedgpu report` on run directories damaged on purpose: never a traceback, never a hang.

Each test runs the real command on a run directory it writes itself: a timeline
(memory.csv) of one round and its events, then one file put in a bad state:
JSON nested too deeply to parse, a FIFO (which once made the report wait for a
writer forever), a symbolic link (refused, not followed), a directory, a file
too large to read. A damaged memory.json is a one-line warning and the table
is derived again from the timeline; with nothing usable left, one line and exit 2.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from fedgpu.monitor.memory import COLUMNS
from fedgpu.monitor.summary import summarise

from helpers import FEDGPU

T0 = 1_700_000_000.0
NESTED = "[" * 100_000  # far deeper than any parser's recursion limit


def make_run(run_dir: Path) -> Path:
    """A minimal run directory as a host-only run leaves it: memory.csv and events.jsonl, round 1."""
    run_dir.mkdir()

    def row(**values: object) -> str:
        return ",".join(str(values.get(column, "")) for column in COLUMNS)

    rows = [",".join(COLUMNS)]
    for i in range(20):
        rows.append(row(time=T0 + i * 0.1, source="host", used_mib=100 + i))
        rows.append(row(time=T0 + i * 0.1, source="host-process", pid=4242, role="client-child", client=0, round=1,
                        message="train", used_mib=50 + i))
    (run_dir / "memory.csv").write_text("\n".join(rows) + "\n")
    events = [
        {"t": T0 - 1, "event": "monitor-start", "gpus": [], "no_gpu": "no GPU here", "gpu_interval_s": 0.5},
        {"t": T0, "event": "round-start", "round": 1},
        {"t": T0 + 1.5, "event": "round-end", "round": 1},
    ]
    (run_dir / "events.jsonl").write_text("".join(json.dumps(event) + "\n" for event in events))
    return run_dir


def report(*run_dirs: Path) -> subprocess.CompletedProcess:
    # A hang is a failure here: TimeoutExpired (the command is killed by subprocess.run).
    return subprocess.run([str(FEDGPU), "report", *map(str, run_dirs)], capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL)


def reported_round_1(done: subprocess.CompletedProcess) -> bool:
    return done.returncode == 0 and re.search(r"^\s*1\s+1\.5\s", done.stdout, re.M) is not None


def no_traceback(done: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout, done.stderr


def one_line(done: subprocess.CompletedProcess) -> str:
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def test_the_minimal_run_directory_is_reported(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    done = report(run)
    assert reported_round_1(done) and done.stderr == "", done


@pytest.mark.parametrize("text", [NESTED, '{"rounds": ' * 100_000, '{"rounds": [], "before_round_1": ' + NESTED])
def test_deeply_nested_memory_json_is_a_one_line_warning(tmp_path: Path, text: str) -> None:
    run = make_run(tmp_path / "run")
    (run / "memory.json").write_text(text)
    done = report(run)
    no_traceback(done)
    assert reported_round_1(done), done  # derived again from the timeline
    assert one_line(done) == (
        f"fedgpu: warning: {run}: memory.json: unreadable (ValueError: nested too deeply to read); "
        "derived again from memory.csv"
    )


def test_deeply_nested_report_json_and_event_lines_do_not_stop_the_report(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    (run / "report.json").write_text('{"a": ' * 100_000)  # not read by the report: nothing to say of it
    with open(run / "events.jsonl", "a") as events:
        events.write(NESTED + "\n")  # a line that is no event is skipped, as a line cut short is
    done = report(run)
    no_traceback(done)
    assert reported_round_1(done) and done.stderr == "", done


def test_a_summary_nested_just_below_the_parsers_limit_does_not_break_the_table(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    summary = summarise(str(run))
    for depth in (900, 980, 995):
        summary["rounds"][0]["host"]["peak_total_mib"] = "DEEP"
        (run / "memory.json").write_text(json.dumps(summary).replace('"DEEP"', "[" * depth + "]" * depth))
        done = report(run)
        no_traceback(done)
        assert done.returncode == 0 and len(done.stderr.strip().splitlines()) <= 1, done


@pytest.mark.parametrize("name", ["memory.json", "events.jsonl", "memory.csv"])
def test_a_fifo_in_place_of_a_run_file_is_refused_in_one_line_without_waiting(tmp_path: Path, name: str) -> None:
    run = make_run(tmp_path / "run")
    (run / name).unlink(missing_ok=True)
    os.mkfifo(run / name)  # nobody will ever write to it
    done = report(run)  # within 30 s, or TimeoutExpired
    no_traceback(done)
    line = one_line(done)
    if name == "memory.csv":  # nothing left to report from
        assert done.returncode == 2, done
        assert line == f"fedgpu: error: {run}: nothing to report: memory.csv: not read: a FIFO, not a regular file"
    else:  # reported from what is left (without its events, a run shows no round)
        assert reported_round_1(done) if name == "memory.json" else done.returncode == 0, done
        assert line.startswith(f"fedgpu: warning: {run}: {name}: not read: a FIFO, not a regular file"), line


def test_a_symlinked_memory_json_is_refused_not_followed(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    summary = summarise(str(run))
    summary["rounds"][0]["round"] = 77  # a valid summary whose table would show round 77
    (elsewhere / "memory.json").write_text(json.dumps(summary))
    (run / "memory.json").symlink_to(elsewhere / "memory.json")
    done = report(run)
    no_traceback(done)
    assert reported_round_1(done), done
    assert not re.search(r"^\s*77\s", done.stdout, re.M), done.stdout  # the link's target was not read
    assert one_line(done) == (
        f"fedgpu: warning: {run}: memory.json: not read: a symbolic link, not followed; derived again from memory.csv"
    )


def test_a_symlinked_timeline_alone_is_nothing_to_report(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    (run / "memory.csv").rename(tmp_path / "memory.csv")
    (run / "memory.csv").symlink_to(tmp_path / "memory.csv")
    done = report(run)
    no_traceback(done)
    assert done.returncode == 2, done
    assert one_line(done) == (f"fedgpu: error: {run}: nothing to report: memory.csv: not read: "
                              "a symbolic link, not followed")


@pytest.mark.parametrize("damage", ["directory", "too-large"])
def test_a_directory_or_an_oversized_memory_json_is_a_one_line_warning(tmp_path: Path, damage: str) -> None:
    run = make_run(tmp_path / "run")
    if damage == "directory":
        (run / "memory.json").mkdir()
        expected = "not read: a directory, not a regular file"
    else:
        with open(run / "memory.json", "wb") as big:
            big.truncate(1 << 30)  # sparse: a GiB of zeros costs no disk
        expected = f"not read: {1 << 30} bytes, more than the"
    done = report(run)
    no_traceback(done)
    assert reported_round_1(done), done
    assert one_line(done).startswith(f"fedgpu: warning: {run}: memory.json: {expected}"), done.stderr
