"""GPU placement and admission control: the logic, then real processes against a fake NVML.

The fake (tests/fake_gpu/pynvml.py) stands in for NVML only; a "CUDA program"
(fake_cuda.allocate) holds memory until its process exits and fails with an
out-of-memory error when the GPU is full, as CUDA does. Everything else runs
for real: the ledger shared by separate processes, spawned children, events.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedgpu.monitor.events import read_events
from fedgpu.nvml.devices import MIB, GpuState, Nvml
from fedgpu.nvml.placement import (
    AdmissionTimedOut,
    GpuPlacer,
    PlacementError,
    PlacementSettings,
    Reservation,
    choose_gpu,
    committed_bytes,
    parse_gpus,
)

from helpers import FAKE_GPU_DIR as FAKE_DIR, load_fake_pynvml


def gpu(index: int, used_mib: int, total_mib: int = 1000, processes: dict[int, int] | None = None) -> GpuState:
    return GpuState(index, f"GPU-{index}", "test", used_mib * MIB, total_mib * MIB, 0,
                    {p: m * MIB for p, m in (processes or {}).items()})


def reservation(index: int, mib: int, child_pid: int | None = None) -> Reservation:
    return Reservation("r", index, mib * MIB, "k", 1, 0.0, child_pid)


# -- the decision itself ---------------------------------------------------


def test_free_policy_picks_the_gpu_with_most_room_after_reservations() -> None:
    gpus = [gpu(0, 100), gpu(1, 300)]
    assert choose_gpu(gpus, [], 500 * MIB, "free") == 0
    # 450 MiB promised on GPU 0 and not yet used: GPU 1 has more room now.
    assert choose_gpu(gpus, [reservation(0, 450)], 500 * MIB, "free") == 1
    assert choose_gpu(gpus, [reservation(0, 450), reservation(1, 300)], 500 * MIB, "free") is None


def test_a_running_child_counts_once_at_the_larger_of_reservation_and_use() -> None:
    # Child 42 reserved 400 and uses 250 of it: 400 committed, not 650.
    state = gpu(0, 250, processes={42: 250})
    assert committed_bytes(state, [reservation(0, 400, child_pid=42)]) == 400 * MIB
    # It outgrew its reservation: what it uses counts.
    state = gpu(0, 700, processes={42: 700})
    assert committed_bytes(state, [reservation(0, 400, child_pid=42)]) == 700 * MIB


def test_round_robin_takes_the_next_gpu_with_room() -> None:
    gpus = [gpu(0, 0), gpu(1, 0), gpu(2, 900)]
    assert choose_gpu(gpus, [], 200 * MIB, "round-robin", next_index=0) == 0
    assert choose_gpu(gpus, [], 200 * MIB, "round-robin", next_index=1) == 1
    assert choose_gpu(gpus, [], 200 * MIB, "round-robin", next_index=2) == 0  # GPU 2 is full: wrap


@pytest.mark.parametrize("text", ["", "0,", "a", "0,,1", "1,1", "-1"])
def test_gpus_lists_are_checked(text: str) -> None:
    with pytest.raises(ValueError, match="--gpus"):
        parse_gpus(text)
    assert parse_gpus("0, 2") == (0, 2)


# -- against the fake NVML -------------------------------------------------


def placer(**settings) -> GpuPlacer:
    return GpuPlacer(PlacementSettings(**settings), Nvml.open())


def test_k_children_whose_peaks_exceed_the_gpus_wait_instead_of_failing(fake_gpus, tmp_path: Path) -> None:
    """Four client nodes (separate processes) each start a child needing 600 MiB on two
    1000 MiB GPUs: two run at once, the others wait, none dies of out-of-memory."""
    fake_gpus({"total_mib": 1000}, {"total_mib": 1000})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    env = {**os.environ, "FEDGPU_GPU_MEM_MIB": "600", "FEDGPU_RUN_DIR": str(run_dir)}
    nodes = [
        # The two admitted children meet before they allocate, so they overlap whatever the load.
        subprocess.Popen([sys.executable, str(FAKE_DIR / "placed_call.py"), str(i), "600", "1.5", "2"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(4)
    ]
    results = []
    for node in nodes:
        out, err = node.communicate(timeout=120)
        assert node.returncode == 0, err[-2000:]  # a child that hit the (fake) CUDA OOM raises here
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(r["placed_on"] for r in results) == [0, 0, 1, 1]
    assert all(r["gpu"] == r["placed_on"] for r in results), "the child ran on the GPU it was given"
    assert sum(r["waited"] > 0 for r in results) >= 2
    events = read_events(str(run_dir))
    waits = [e for e in events if e["event"] == "admission-wait"]
    assert len(waits) >= 2 and all(e["seconds"] > 0 for e in waits)
    spans = {}
    for e in events:
        if e["event"] in ("child-start", "child-end"):
            spans.setdefault(e["pid"], {})[e["event"]] = e["t"]
    at_once = max(sum(s["child-start"] <= t < s["child-end"] for s in spans.values())
                  for t in [s["child-start"] for s in spans.values()])
    assert at_once == 2
    # Each child measured its own peak; the ledger learned it and holds no reservation now.
    assert all(r["peak_mib"] == 600 for r in results)
    state = json.loads((tmp_path / "ledger" / "gpu-ledger.json").read_text())
    assert state["reservations"] == {} and state["peaks"]["fake/train"] == [600 * MIB] * 4


def test_the_same_load_without_admission_dies_of_out_of_memory(fake_gpus, tmp_path: Path) -> None:
    """The control: with an estimate far below the real peak, the fake CUDA does run out."""
    fake_gpus({"total_mib": 1000})
    env = {**os.environ, "FEDGPU_GPU_MEM_MIB": "1"}
    nodes = [subprocess.Popen([sys.executable, str(FAKE_DIR / "placed_call.py"), str(i), "600", "1.5", "2"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [node.communicate(timeout=120) for node in nodes]
    assert sorted(node.returncode for node in nodes) == [0, 1]
    assert any("CUDA out of memory" in err for _, err in outputs)


def test_estimate_comes_from_the_flag_then_from_measured_peaks(fake_gpus) -> None:
    fake_gpus({"total_mib": 1000})
    p = placer(estimate_mib=700)
    assert p.estimate_bytes("t/train") == 700 * MIB
    first = p.acquire("t/train")
    assert first.reserved_bytes == 700 * MIB
    p.release(first, measured_peak_bytes=300 * MIB)
    assert p.estimate_bytes("t/train") == int(300 * MIB * 1.1)  # learned, with a 10 % margin
    assert p.estimate_bytes("t/evaluate") == 700 * MIB  # per task and message type


def test_round_robin_spreads_children_and_free_fills_the_emptiest(fake_gpus) -> None:
    fake_gpus({"total_mib": 2000}, {"total_mib": 2000}, {"total_mib": 2000, "other_mib": 1500})
    spread = placer(policy="round-robin", estimate_mib=100)
    assert [spread.acquire("t/train").gpu for _ in range(5)] == [0, 1, 2, 0, 1]
    # With those five reserved (200 on 0 and 1, 100 + someone's 1500 on 2), "free" picks the emptiest.
    assert placer(estimate_mib=100).acquire("t/train").gpu == 0


def test_admission_waits_a_bounded_time_and_says_what_was_missing(fake_gpus) -> None:
    fake_gpus({"total_mib": 1000, "other_mib": 900})  # someone else's process holds 900
    p = placer(estimate_mib=600, admission_timeout=0.6)
    started = time.monotonic()
    with pytest.raises(AdmissionTimedOut, match=r"no GPU had 600 MiB free .* GPU 0 100"):
        p.acquire("t/train")
    assert 0.5 < time.monotonic() - started < 5


def test_a_request_no_gpu_could_ever_hold_fails_at_once(fake_gpus) -> None:
    fake_gpus({"total_mib": 1000})
    with pytest.raises(PlacementError, match="exceeds the largest GPU"):
        placer(estimate_mib=5000).acquire("t/train")


def test_reservations_of_a_dead_process_are_dropped(fake_gpus, tmp_path: Path) -> None:
    """A node killed while its child held a reservation does not block the GPU forever."""
    fake_gpus({"total_mib": 1000})
    script = (
        "from fedgpu.nvml.placement import GpuPlacer, PlacementSettings\n"
        "p = GpuPlacer.from_settings(PlacementSettings(estimate_mib=800))\n"
        "p.acquire('t/train'); print('reserved', flush=True)\n"
        "import time; time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "reserved"
        with pytest.raises(AdmissionTimedOut):
            placer(estimate_mib=800, admission_timeout=0.3).acquire("t/train")
    finally:
        holder.kill()
        holder.wait()
    assert placer(estimate_mib=800, admission_timeout=0.3).acquire("t/train").gpu == 0


def test_gpus_restricts_and_cuda_visible_devices_is_respected(fake_gpus, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpus({"total_mib": 2000}, {"total_mib": 2000}, {"total_mib": 2000})
    placement = placer(gpus=(2,)).acquire("t/train")
    assert placement.gpu == 2 and placement.env() == {"CUDA_VISIBLE_DEVICES": "GPU-fake-2", "FEDGPU_GPU": "2"}
    with pytest.raises(PlacementError, match="this host has GPUs 0..2"):
        placer(gpus=(0, 3))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-fake-1")  # a scheduler gave this job GPU 1 only
    assert placer().candidates == [1]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")
    with pytest.raises(PlacementError, match="names no GPU"):
        placer()


def test_without_nvml_there_is_no_placement_and_gpus_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", load_fake_pynvml())
    monkeypatch.delenv("FAKE_NVML_DIR", raising=False)  # the fake then fails as NVML does without a driver
    lines: list[str] = []
    assert GpuPlacer.from_settings(PlacementSettings(), log=lines.append) is None
    assert lines == ["no GPU placement: NVML: NVML Shared Library Not Found"]
    with pytest.raises(PlacementError, match="--gpus 0 given, but NVML"):
        GpuPlacer.from_settings(PlacementSettings(gpus=(0,)))
