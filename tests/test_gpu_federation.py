"""End to end through ./run.sh on fake GPUs: admission control, and --mp against in-process.

NVML is the fake in tests/fake_gpu; the task is digits whose train and evaluate
also hold fake GPU memory until their process exits, as CUDA does. SuperLink,
nodes, zygote, children, ledger and reports are real.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from helpers import FAKE_GPU_DIR, FEDGPU, read_metrics, run_federation

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # whole runs

TASK = "fake_gpu_task:FakeGpuDigits"


def fake_gpu_env(tmp_path: Path, gpus: list[dict], mib: int) -> None:
    nvml_dir = tmp_path / "nvml"
    nvml_dir.mkdir(exist_ok=True)
    (nvml_dir / "gpus.json").write_text(json.dumps(gpus))
    os.environ.update(
        FAKE_NVML_DIR=str(nvml_dir),
        FAKE_GPU_MIB=str(mib),
        FEDGPU_LEDGER=str(tmp_path / "ledger"),
        PYTHONPATH=os.pathsep.join([str(FAKE_GPU_DIR), os.environ.get("PYTHONPATH", "")]),
    )


def test_mp_releases_gpu_memory_between_rounds_and_in_process_keeps_it(tmp_path: Path, monkeypatch) -> None:
    for key in ("FAKE_NVML_DIR", "FAKE_GPU_MIB", "FEDGPU_LEDGER", "PYTHONPATH"):
        monkeypatch.setenv(key, os.environ.get(key, ""))  # restored afterwards
    # Four clients all train each round, each child peaking at 400 MiB, on one 1000 MiB GPU.
    # Two admitted children meet and hold their memory 4 s, longer than the 3 s in which
    # every node fetches its message, so the other two always ask while the GPU is full.
    monkeypatch.setenv("FAKE_GPU_TRAIN_TOGETHER", "2")
    monkeypatch.setenv("FAKE_GPU_HOLD_S", "4")
    fake_gpu_env(tmp_path, [{"total_mib": 1000, "name": "Fake 1G"}], 400)
    mp_dir = tmp_path / "mp"
    code, output, _ = run_federation(mp_dir, "4", "4", "4", "2", "--task", TASK, "--gpu-mem", "400")
    assert code == 0, output
    rows = read_metrics(mp_dir)
    assert all(int(r["results"]) == 4 and int(r["failures"]) == 0 for r in rows), rows  # no OOM: the excess waited
    summary = json.loads((mp_dir / "memory.json").read_text())
    assert summary["gpu_available"] and summary["admission"]["waits"] >= 2, summary["admission"]
    for entry in summary["rounds"]:
        gpu = entry["gpu"]
        assert gpu["peak_ours_mib"] == 800.0 and gpu["peak_holders"] <= 2
        assert (gpu["at_rest_ours_mib"], gpu["at_rest_holders"], gpu["clients_holding_at_rest"]) == (0.0, 0, 0)
        assert set(gpu["per_client_peak_mib"]) == {"0", "1", "2", "3"}
    report = json.loads((mp_dir / "report.json").read_text())
    reserved = [[m["gpu-reserved-mib"] for m in r["messages"]] for r in report["rounds"]]
    assert reserved[0][0] == 400 and reserved[-1] == [440.0] * 4, reserved  # learned: measured 400 + 10 %
    assert all(m["gpu"] == 0 and m["child-gpu-peak-mib"] == 400 for r in report["rounds"] for m in r["messages"])
    assert "admission waits" in output and re.search(r"^\s*2\s", output, re.M), output  # the table on the console

    # The baseline: every node that trained keeps its memory; a bigger GPU so that it fits.
    monkeypatch.delenv("FAKE_GPU_TRAIN_TOGETHER")
    monkeypatch.setenv("FAKE_GPU_HOLD_S", "0.5")
    fake_gpu_env(tmp_path, [{"total_mib": 4000, "name": "Fake 4G"}], 400)
    base_dir = tmp_path / "in-process"
    code, output, _ = run_federation(base_dir, "4", "4", "2", "2", "--task", TASK, "--no-mp")
    assert code == 0, output
    rounds = json.loads((base_dir / "memory.json").read_text())["rounds"]
    holding = [entry["gpu"]["clients_holding_at_rest"] for entry in rounds]
    # Grows with the clients that have trained so far (sampling is random: count them).
    trained: set[int] = set()
    have_trained = []
    for entry in json.loads((base_dir / "report.json").read_text())["rounds"]:
        trained |= {m["node_id"] for m in entry["messages"]}
        have_trained.append(len(trained))
    assert holding == have_trained and holding[0] == 2, (holding, have_trained)
    assert [entry["gpu"]["at_rest_ours_mib"] for entry in rounds] == [400.0 * n for n in holding]
    assert all(set(entry["gpu"]["at_rest_by_role_mib"]) == {"client-node"} for entry in rounds)

    compared = subprocess.run([str(FEDGPU), "report", str(mp_dir), str(base_dir)], capture_output=True, text=True,
                              timeout=60)
    assert compared.returncode == 0, compared.stderr
    for rnd in (1, 2):
        match = re.search(rf"^\s*{rnd}\s+clients holding\s+0\s+(\d+)\s+(\d+)\s*$", compared.stdout, re.M)
        assert match and match.group(1) == match.group(2) == str(holding[rnd - 1]), compared.stdout


def test_without_a_true_estimate_the_same_load_dies_of_out_of_memory(tmp_path: Path, monkeypatch) -> None:
    """The control for the test above: reserve 1 MiB per child and the GPU overflows.

    The four children are made to meet before they allocate: on a busy
    machine they could otherwise run one after another and all fit.
    """
    for key in ("FAKE_NVML_DIR", "FAKE_GPU_MIB", "FEDGPU_LEDGER", "PYTHONPATH"):
        monkeypatch.setenv(key, os.environ.get(key, ""))
    monkeypatch.setenv("FAKE_GPU_TRAIN_TOGETHER", "4")
    fake_gpu_env(tmp_path, [{"total_mib": 1000}], 400)
    run_dir = tmp_path / "run"
    code, output, _ = run_federation(run_dir, "4", "4", "4", "1", "--task", TASK, "--gpu-mem", "1")
    assert code == 0, output
    assert int(read_metrics(run_dir)[0]["failures"]) == 2  # two fit in 1000 MiB, two do not
    failed = json.loads((run_dir / "report.json").read_text())["rounds"][0]["failed_messages"]
    assert failed and all("CUDA out of memory" in f["error"] for f in failed), failed
