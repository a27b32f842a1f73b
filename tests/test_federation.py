"""End to end through ./run.sh: a real SuperLink, real client nodes, real children."""

from __future__ import annotations

import csv
import inspect
import json
import re
from pathlib import Path

import pytest

from fedgpu.tasks.digits import DigitsTask

from helpers import ProcessSampler, pid_alive, read_metrics, run_federation

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # whole runs


def test_three_nodes_two_rounds_with_mp_share_one_zygote(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    code, output, sampler = run_federation(run_dir, "3", "3", "3", "2", "--eval-sampled", "1")
    assert code == 0, output

    rows = read_metrics(run_dir)
    assert [int(r["round"]) for r in rows] == [1, 2]
    assert all(int(r["results"]) == 3 and int(r["failures"]) == 0 for r in rows), rows
    assert all(int(r["eval_results"]) == 1 for r in rows), rows
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "completed"
    accuracies = [report["initial"]["accuracy"]] + [float(r["server_accuracy"]) for r in rows]
    assert accuracies[-1] > accuracies[0] + 0.3, accuracies
    assert (run_dir / "model.npz").exists()
    assert output.count("[fedgpu] round ") == 2, output  # one console line per round

    messages = [m for r in report["rounds"] for m in r["messages"]]
    train = [m for m in messages if m["type"] == "train"]
    assert len(train) == 6
    # The config as used: where the run left lr, local-epochs and batch-size at 0, the task's defaults, which
    # the children trained with (lr-decay 1: every round's lr is the base lr).
    config = report["config"]
    assert sorted(report["config_from_task_defaults"]) == ["batch-size", "local-epochs", "lr"]
    assert {(m["lr"], m["local-epochs"]) for m in train} == {(config["lr"], config["local-epochs"])}, (config, train)
    assert config["batch-size"] == inspect.signature(DigitsTask.__init__).parameters["batch_size"].default
    child_pids = [m["child-pid"] for m in messages]
    node_pids = {m["node-pid"] for m in messages}
    assert len(set(child_pids)) == len(child_pids), "every message ran in its own child"
    assert not node_pids & set(child_pids)
    assert len(node_pids) == 3
    assert not any(pid_alive(pid) for pid in child_pids), "children are gone afterwards"
    assert all(m["isolation"] == "zygote" and m["node-torch-loaded"] is False for m in messages)

    # The parent side never mapped torch or CUDA; the zygote and its children did.
    assert len(sampler.long_lived(torch=False)) >= 5, sampler.seen
    assert sampler.long_lived(torch=True) == []
    # A zygote's forked children run its command line too: a zygote is one whose parent is not of the run
    # (a process gone before its parent could be read is left out: it cannot be told apart).
    zygotes = [pid for pid, cmd in sampler.seen.items()
               if "fedgpu.isolation.zygote" in cmd and pid in sampler.parent
               and sampler.parent[pid] not in sampler.seen]
    assert len(zygotes) == 1, "one zygote for the host, no private ones"
    assert zygotes[0] in sampler.torch_pids
    # A child seen whose parent it could not read (it exited between the two reads) cannot be placed.
    seen_children = [pid for pid in child_pids if pid in sampler.seen and pid in sampler.parent]
    assert seen_children, "the sampler must see some children"
    assert all(sampler.parent[pid] == zygotes[0] for pid in seen_children), "forked by the shared zygote"
    assert any(pid in sampler.torch_pids for pid in seen_children)

    # The server recorded the memory of every process of the run.
    memory = report["host_memory"]
    assert memory["samples"] > 5 and memory["pss_samples"] >= 1
    assert 0 < memory["peak_total_pss_mib"] <= memory["peak_total_rss_mib"]
    assert 0 < memory["host_min_available_mib"] < memory["host_total_mib"]
    assert memory["by_kind"]["client-node"]["most_at_once"] == 3
    assert memory["by_kind"]["zygote"]["processes_seen"] == 1
    assert memory["by_kind"]["call-child"]["processes_seen"] >= 1

    # The memory reports: from NVML where it sees a GPU, else from host memory, saying so.
    summary = json.loads((run_dir / "memory.json").read_text())
    assert (run_dir / "memory.png").read_bytes()[:4] == b"\x89PNG"
    assert [entry["round"] for entry in summary["rounds"]] == [1, 2]
    if not summary["gpu_available"]:
        assert summary["note"].startswith("no GPU (") and summary["note"] in output
    for entry in summary["rounds"]:
        host = entry["host"]
        assert 0 < host["at_rest_total_mib"] and 0 < host["peak_total_mib"]
        assert set(host["per_client_peak_mib"]) == {"0", "1", "2"}
        # At rest: the nodes and the zygote, never a message child (not the next round's first one either).
        assert host["at_rest_by_role_mib"]["client-node"] > 0 and "client-child" not in host["at_rest_by_role_mib"]
        assert entry["admission"]["waits"] == 0
    with open(run_dir / "memory.csv") as handle:
        roles = {row["role"] for row in csv.DictReader(handle) if row["source"] == "host-process"}
    assert {"client-node", "zygote", "server-side"} <= roles


@pytest.fixture(scope="module")
def spawn_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, ProcessSampler]:
    """One spawn-mode run, read by the tests below: its batch (1000) is larger than either partition."""
    run_dir = tmp_path_factory.mktemp("spawn") / "run"
    code, output, sampler = run_federation(run_dir, "2", "2", "2", "1", "--isolation", "spawn", "--batch-size", "1000")
    assert code == 0, output
    return run_dir, output, sampler


def test_spawn_remains_a_mode(spawn_run: tuple[Path, str, ProcessSampler]) -> None:
    run_dir, _, sampler = spawn_run
    report = json.loads((run_dir / "report.json").read_text())
    messages = report["rounds"][0]["messages"]
    assert len(messages) == 2
    assert all(m["isolation"] == "spawn" and m["node-torch-loaded"] is False for m in messages)
    assert not any("fedgpu.isolation.zygote" in cmd for cmd in sampler.seen.values())


def test_a_partition_smaller_than_one_batch_is_a_warning_on_the_console(
    spawn_run: tuple[Path, str, ProcessSampler],
) -> None:
    run_dir, output, _ = spawn_run
    warnings = [line for line in output.splitlines() if "[fedgpu] warning:" in line]
    assert len(warnings) == 1, output  # once per run, not once per client and round
    assert re.search(r"\[fedgpu\] warning: client [01]: partition [01] of 2 holds \d+ examples, fewer than one batch "
                     r"\(1000\) \(and 1 more alike\)$", warnings[0]), warnings
    assert len(json.loads((run_dir / "report.json").read_text())["warnings"]) == 2


def test_without_mp_the_node_itself_loads_torch(tmp_path: Path) -> None:
    """The baseline that holds memory: proves the check above can fail."""
    run_dir = tmp_path / "run"
    code, output, sampler = run_federation(run_dir, "2", "2", "2", "1", "--no-mp")
    assert code == 0, output
    report = json.loads((run_dir / "report.json").read_text())
    messages = report["rounds"][0]["messages"]
    assert len(messages) == 2
    assert all(m["isolation"] == "none" and m["child-pid"] == m["node-pid"] for m in messages)
    assert all(m["node-torch-loaded"] is True for m in messages)
    assert any("fedgpu client" in cmd for cmd in sampler.long_lived(torch=True))
