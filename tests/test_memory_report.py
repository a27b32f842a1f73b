"""The memory monitor and its reports: real processes holding (fake) GPU memory.

NVML is the fake in tests/fake_gpu (the one edge a machine without a GPU
cannot reach); the processes, their events, the timeline, memory.json, the
plot and `fedgpu report` are real.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedgpu.monitor.events import emit, read_events
from fedgpu.monitor.memory import COLUMNS, MemoryMonitor
from fedgpu.monitor.plot import write_plot
from fedgpu.monitor.summary import read_timeline, summarise, write_summary
from fedgpu.nvml.devices import Nvml

from helpers import FEDGPU

HOLDER = (
    "import sys, time, fake_cuda\n"
    "fake_cuda.allocate(300)\n"
    "print('held', flush=True)\n"
    "time.sleep(float(sys.argv[1]))\n"
)


def monitored_round(run_dir: Path, *, child_exits: bool) -> subprocess.Popen:
    """One round in which client 3's work holds 300 MiB on GPU 1, in a child that
    exits (isolation) or in the node itself, which stays (the baseline)."""
    run_dir.mkdir()
    env = {**os.environ, "FEDGPU_RUN_DIR": str(run_dir), "CUDA_VISIBLE_DEVICES": "GPU-fake-1"}
    monitor = MemoryMonitor(str(run_dir), str(run_dir), nvml=Nvml.open(), gpu_interval=0.05,
                            host_interval=(0.05, 0.2)).start()
    worker = subprocess.Popen([sys.executable, "-c", HOLDER, "0.6" if child_exits else "120"], env=env,
                              stdout=subprocess.PIPE, text=True)
    if not child_exits:
        emit("node-start", str(run_dir), pid=worker.pid, client=3, isolation="none")
    emit("round-start", str(run_dir), round=1)
    emit("child-start", str(run_dir), pid=worker.pid, role="client-child", client=3, round=1, message="train")
    assert worker.stdout.readline().strip() == "held"
    if child_exits:
        worker.wait(timeout=30)
    else:
        time.sleep(0.6)
    emit("child-end", str(run_dir), pid=worker.pid, role="client-child", client=3, round=1, message="train",
         gpu_peak_mib=300.0)
    emit("round-end", str(run_dir), round=1)
    time.sleep(0.6)  # at rest
    monitor.stop()
    return worker


def test_gpu_memory_is_mapped_to_client_round_and_message_and_released_with_the_child(
    fake_gpus, tmp_path: Path
) -> None:
    fake_gpus({"total_mib": 1000, "name": "Fake A"}, {"total_mib": 1000, "name": "Fake B"})
    run_dir = tmp_path / "mp"
    worker = monitored_round(run_dir, child_exits=True)
    with open(run_dir / "memory.csv") as handle:
        rows = list(csv.DictReader(handle))
    mine = [r for r in rows if r["source"] == "gpu-process" and r["pid"] == str(worker.pid)]
    assert mine, "the child was sampled on the GPU"
    assert {(r["gpu"], r["role"], r["client"], r["round"], r["message"], r["used_mib"]) for r in mine} == {
        ("1", "client-child", "3", "1", "train", "300.0")
    }
    assert {r["gpu"] for r in rows if r["source"] == "gpu"} == {"0", "1"}
    assert any(r["source"] == "host-process" and r["pid"] == str(worker.pid) and r["client"] == "3" for r in rows)

    summary = write_summary(str(run_dir))
    assert summary["gpu_available"] and summary["note"] is None
    assert [g["name"] for g in summary["gpus"]] == ["Fake A", "Fake B"]
    gpu = summary["rounds"][0]["gpu"]
    assert gpu["peak_ours_mib"] == 300.0 and gpu["peak_holders"] == 1
    assert gpu["per_client_peak_mib"] == {"3": 300.0}
    assert gpu["peak_total_per_gpu_mib"] == {"0": 0.0, "1": 300.0}
    assert (gpu["at_rest_ours_mib"], gpu["at_rest_holders"], gpu["clients_holding_at_rest"]) == (0.0, 0, 0)
    assert summary["rounds"][0]["host"]["per_client_peak_mib"]["3"] > 0

    png = write_plot(str(run_dir), summary)
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_node_that_ran_its_work_itself_holds_the_memory_at_rest(fake_gpus, tmp_path: Path) -> None:
    fake_gpus({"total_mib": 1000}, {"total_mib": 1000})
    node = monitored_round(tmp_path / "baseline", child_exits=False)
    try:
        gpu = write_summary(str(tmp_path / "baseline"))["rounds"][0]["gpu"]
    finally:
        node.kill()
        node.wait()
    assert (gpu["at_rest_ours_mib"], gpu["at_rest_holders"], gpu["clients_holding_at_rest"]) == (300.0, 1, 1)
    assert gpu["at_rest_by_role_mib"] == {"client-node": 300.0}


def _write_host_timeline(run_dir: Path, events: list[dict], samples: dict[float, list[tuple]]) -> None:
    """A run directory as the monitor leaves it: events.jsonl, and memory.csv's host rows
    (per sample: (pid, role, client, round, MiB) of each process of ours)."""
    run_dir.mkdir()
    (run_dir / "events.jsonl").write_text("".join(json.dumps(event) + "\n" for event in events))
    with open(run_dir / "memory.csv", "w", newline="") as handle:
        rows = csv.writer(handle)
        rows.writerow(COLUMNS)
        for t, processes in samples.items():
            fields = dict.fromkeys(COLUMNS, "")
            rows.writerow({**fields, "time": t, "source": "host", "used_mib": sum(p[4] for p in processes)}.values())
            for pid, role, client, server_round, used in processes:
                row = {**fields, "time": t, "source": "host-process", "pid": pid, "role": role, "client": client,
                       "round": server_round, "used_mib": used}
                rows.writerow(row.values())


def _round_events(server_round: int, start: float, child_pid: int) -> list[dict]:
    """A round of one client-child (client 0) that runs from start+0.1 to start+3; the round ends at start+4."""
    return [
        {"t": start, "event": "round-start", "round": server_round},
        {"t": start + 0.1, "event": "child-start", "pid": child_pid, "role": "client-child", "client": 0,
         "round": server_round, "message": "train"},
        {"t": start + 3, "event": "child-end", "pid": child_pid, "role": "client-child", "client": 0,
         "round": server_round, "message": "train", "rss_peak_mib": 500.0},
        {"t": start + 4, "event": "round-end", "round": server_round},
    ]


NODE, ZYGOTE = (11, "client-node", "0", "", 100.0), (12, "zygote", "", "", 300.0)


def test_at_rest_never_counts_the_next_rounds_first_child(tmp_path: Path) -> None:
    """Round 2 starts 0.2 s after round 1 ends, within one sampling interval: no sample falls between them,
    and the first one after has caught round 2's child. At rest after round 1 is the nodes and the zygote."""
    run_dir = tmp_path / "run"
    _write_host_timeline(run_dir, _round_events(1, 100.0, 21) + _round_events(2, 104.2, 22), {
        101.0: [NODE, ZYGOTE, (21, "client-child", "0", 1, 500.0)],
        105.0: [NODE, ZYGOTE, (22, "client-child", "0", 2, 800.0)],
        110.0: [NODE, ZYGOTE],
    })
    first, second = (entry["host"] for entry in summarise(str(run_dir))["rounds"])
    assert first["peak_total_mib"] == 900.0
    assert "client-child" not in first["at_rest_by_role_mib"], first
    assert first["at_rest_by_role_mib"] == {"client-node": 100.0, "zygote": 300.0}
    assert (first["at_rest_total_mib"], first["at_rest_ours_mib"], first["at_rest_holders"]) == (400.0, 400.0, 2)
    assert first["clients_holding_at_rest"] == 1  # through its node
    assert (second["at_rest_total_mib"], second["at_rest_by_role_mib"]) == (
        400.0, {"client-node": 100.0, "zygote": 300.0})


def test_a_child_still_alive_between_rounds_is_counted_at_rest(tmp_path: Path) -> None:
    """A message child that outlives its round (its node let it go; it still holds memory) is what at rest is
    for: only a later round's children are left out."""
    run_dir = tmp_path / "run"
    _write_host_timeline(run_dir, _round_events(1, 100.0, 21) + _round_events(2, 106.0, 22), {
        101.0: [NODE, ZYGOTE, (21, "client-child", "0", 1, 500.0)],
        105.0: [NODE, ZYGOTE, (21, "client-child", "0", 1, 450.0)],
        107.0: [NODE, ZYGOTE, (22, "client-child", "0", 2, 800.0)],
    })
    first = summarise(str(run_dir))["rounds"][0]["host"]
    assert first["at_rest_by_role_mib"] == {"client-child": 450.0, "client-node": 100.0, "zygote": 300.0}
    assert first["at_rest_total_mib"] == 850.0


def test_fedgpu_report_prints_one_run_and_two_side_by_side(fake_gpus, tmp_path: Path) -> None:
    fake_gpus({"total_mib": 1000}, {"total_mib": 1000})
    monitored_round(tmp_path / "a", child_exits=True)
    node = monitored_round(tmp_path / "b", child_exits=False)
    node.kill()
    node.wait()
    for run in ("a", "b"):
        write_summary(str(tmp_path / run))
    (tmp_path / "b" / "memory.json").unlink()  # derived again from memory.csv and events.jsonl

    one = subprocess.run([str(FEDGPU), "report", str(tmp_path / "a")], capture_output=True, text=True, timeout=60)
    assert one.returncode == 0, one.stderr
    header, rule, *rows = one.stdout.splitlines()[1:]
    assert "ours at rest" in header and set(rule) <= {"-", " "}
    round_1 = rows[-1].split()
    assert round_1[0] == "1" and len(round_1) == len(re.split(r"\s{2,}", header.strip()))

    two = subprocess.run([str(FEDGPU), "report", str(tmp_path / "a"), str(tmp_path / "b")], capture_output=True,
                         text=True, timeout=60)
    assert two.returncode == 0, two.stderr
    assert re.search(r"^\s*1\s+ours at rest\s+0\.0\s+300\s+300\s*$", two.stdout, re.M), two.stdout
    assert re.search(r"^\s*1\s+clients holding\s+0\s+1\s+1\s*$", two.stdout, re.M), two.stdout


def test_without_a_gpu_the_same_files_come_from_host_memory(
    fake_gpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FAKE_NVML_DIR")  # NVML fails as it does on a machine without a driver
    from fedgpu.nvml.devices import open_nvml

    nvml, why = open_nvml()
    assert nvml is None and "Not Found" in why
    run_dir = tmp_path / "cpu"
    run_dir.mkdir()
    env = {**os.environ, "FEDGPU_RUN_DIR": str(run_dir)}
    monitor = MemoryMonitor(str(run_dir), str(run_dir), nvml=None, no_gpu_reason=why, host_interval=(0.05, 0.2)).start()
    emit("round-start", str(run_dir), round=1)
    worker = subprocess.Popen([sys.executable, "-c", "import time; b = bytearray(200 << 20); time.sleep(0.8)"], env=env)
    emit("child-start", str(run_dir), pid=worker.pid, role="client-child", client=0, round=1, message="train")
    worker.wait(timeout=30)
    emit("round-end", str(run_dir), round=1)
    time.sleep(0.4)
    monitor.stop()
    summary = write_summary(str(run_dir))
    assert not summary["gpu_available"] and summary["note"] == f"no GPU ({why}): memory figures are host RSS only"
    host = summary["rounds"][0]["host"]
    assert host["per_client_peak_mib"]["0"] >= 200 and "gpu" not in summary["rounds"][0]
    write_plot(str(run_dir), summary)
    out = subprocess.run([str(FEDGPU), "report", str(run_dir)], capture_output=True, text=True, timeout=60).stdout
    assert summary["note"] in out and "host at rest MiB" in out and "ours at rest" not in out


def test_samples_taken_back_to_back_stay_apart(fake_gpus, tmp_path: Path) -> None:
    """A busy host delays the monitor, which then samples twice in quick succession: the two
    must stay two moments (they were merged into one, doubling every figure, in a loaded CI)."""
    fake_gpus({"total_mib": 1000})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    env = {**os.environ, "FEDGPU_RUN_DIR": str(run_dir)}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, "120"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monitor = MemoryMonitor(str(run_dir), str(run_dir), nvml=Nvml.open())
        emit("child-start", str(run_dir), pid=holder.pid, role="client-child", client=0, round=1, message="train")
        monitor.registry.absorb(read_events(str(run_dir)))
        for _ in range(50):
            monitor.sample_gpus()
        monitor.stop()
    finally:
        holder.kill()
        holder.wait()
    gpu, _ = read_timeline(str(run_dir))
    assert len(gpu) == 50
    assert {moment.ours for moment in gpu} == {300.0} and {moment.holders for moment in gpu} == {1}


def test_a_timeline_that_cannot_be_written_stops_the_monitor_and_says_which_file(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    errors = []
    monitor = MemoryMonitor(str(run_dir), str(run_dir), nvml=None, host_interval=(0.05, 0.05), on_error=errors.append)
    monitor._file.close()
    monitor._file = open("/dev/full", "w")  # noqa: SIM115 - the device of a full disk: every write fails
    monitor._csv = csv.writer(monitor._file)
    monitor.start()
    deadline = time.monotonic() + 30
    while not errors and time.monotonic() < deadline:
        time.sleep(0.05)
    monitor.stop()
    assert errors and str(errors[0]) == f"cannot write {run_dir / 'memory.csv'}: No space left on device"
    assert monitor.error is errors[0]


@pytest.fixture
def recorded_run(tmp_path: Path) -> Path:
    """A real timeline and events of a short round, without a GPU: memory.csv, events.jsonl."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    monitor = MemoryMonitor(str(run_dir), str(run_dir), nvml=None, no_gpu_reason="no GPU here",
                            host_interval=(0.05, 0.1)).start()
    emit("round-start", str(run_dir), round=1)
    time.sleep(0.5)
    emit("round-end", str(run_dir), round=1)
    time.sleep(0.3)
    monitor.stop()
    return run_dir


def _report(run_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(FEDGPU), "report", str(run_dir)], capture_output=True, text=True, timeout=60)


def test_report_on_a_timeline_cut_by_a_kill_still_reports_with_a_note(recorded_run: Path) -> None:
    data = (recorded_run / "memory.csv").read_bytes()
    rows = data.count(b"\n") - 1  # below the header
    (recorded_run / "memory.csv").write_bytes(data[: data.rstrip(b"\n").rfind(b",")])  # the last row cut mid-way
    done = _report(recorded_run)
    assert done.returncode == 0, done.stderr
    assert re.search(r"^\s*1\s", done.stdout, re.M), done.stdout  # round 1 is reported
    assert done.stderr.strip() == (
        f"fedgpu: warning: {recorded_run}: memory.csv: 1 of {rows} rows unreadable and skipped "
        "(the last one cut short: the run was stopped mid-write)"
    ), done.stderr


@pytest.mark.parametrize("damage", ["garbage", "empty", "foreign-json", "foreign-json-alone", "garbage-json"])
def test_report_on_damaged_files_warns_or_refuses_in_one_line(recorded_run: Path, damage: str) -> None:
    timeline, summary = recorded_run / "memory.csv", recorded_run / "memory.json"
    if damage == "garbage":
        timeline.write_bytes(bytes(range(256)) * 20)
    elif damage == "empty":
        timeline.write_bytes(b"")
        summary.write_bytes(b"")
    elif damage.startswith("foreign-json"):
        summary.write_text('{"rounds": [{"round": "one"}], "hello": "world"}')
        if damage == "foreign-json-alone":
            timeline.unlink()
    else:
        summary.write_bytes(b"\xff\xfe{not json")
    done = _report(recorded_run)
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    if damage in ("foreign-json", "garbage-json"):  # the timeline is still there: reported, with a warning
        assert done.returncode == 0 and re.search(r"^\s*1\s", done.stdout, re.M), done
        assert len(lines) == 1 and lines[0].startswith(f"fedgpu: warning: {recorded_run}: memory.json: "), lines
    else:
        assert done.returncode == 2 and len(lines) == 1, done
        assert lines[0].startswith(f"fedgpu: error: {recorded_run}: nothing to report: "), lines


def test_a_fork_of_a_node_that_has_not_exec_d_is_not_counted_as_a_second_node(tmp_path: Path) -> None:
    """A node's fork before its exec (subprocess, a library's helper) carries the node's command line: not a node."""
    from fedgpu.monitor.host import HostMemorySampler

    script = tmp_path / "fedgpu"  # a `fedgpu client` by its command line, as the sampler reads it
    ready = tmp_path / "forked"
    script.write_text(
        "import os, sys, time\n"
        "if os.fork() == 0:\n"
        f"    open({str(ready)!r}, 'w').close()\n"
        "    time.sleep(30)\n"
        "    os._exit(0)\n"
        "time.sleep(30)\n"
    )
    marker = str(tmp_path)
    node = subprocess.Popen([sys.executable, str(script), "client", "--superlink", "127.0.0.1:1"],
                            env={**os.environ, "FEDGPU_RUN_DIR": marker}, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), "the node's fork did not start"
        sampler = HostMemorySampler(marker)
        kinds = sorted(kind for _, kind, _ in sampler.sample())
        assert kinds == ["client-node", "fork"], kinds
        assert sampler.summary()["by_kind"]["client-node"]["most_at_once"] == 1
    finally:
        os.killpg(node.pid, 9)
        node.wait()
