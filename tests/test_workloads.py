"""The seed workloads (issue 6) offline: their real loading code on local files of their datasets'
schemas, model construction without downloads, one federated round each through ./run.sh, and
`fedgpu bench-models` as a user runs it."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

# Hub access must fail fast instead of retrying (set before `datasets` is imported).
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch

from fedgpu.tasks import data_problem, installed_tasks, load_task, resolve_task
from fedgpu.tasks.vit_flowers import WEIGHTS_URL, VitFlowersTask

import workload_data
from helpers import FEDGPU, ROOT, read_metrics, run_federation

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the Arrow files `datasets` derives from parquet out of ~/.cache (here and in children)."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("workloads")
    return {
        "cifar10": workload_data.cifar10(root / "cifar10"),
        "flowers": workload_data.flowers(root / "flowers"),
        "imdb": workload_data.imdb(root / "imdb"),
        "bert": workload_data.tiny_bert(root / "bert"),
    }


# --- vit-flowers --------------------------------------------------------------------


def test_vit_flowers_trains_only_the_head_and_sends_only_its_arrays(data: dict[str, Path]) -> None:
    task = load_task("vit-flowers", {"data_files": str(data["flowers"]), "weights": "none", "batch_size": "2"})
    # 20 partitions by default, whatever the number of client nodes: node 1 of 2 gets part 1 of 20.
    assert task.partition_of(1, 2) == (1, 20)
    with pytest.raises(ValueError, match="splits its data into 20 partitions; there is no partition 20"):
        task.partition_of(20, 25)
    assert [len(task.partition(i, 20)) for i in range(20)] == [2] * 20

    model = task.build_model()
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["heads.head.weight", "heads.head.bias"]
    arrays = task.get_arrays(model)
    assert [a.shape for a in arrays] == [(102, 768), (102,)]  # 78 k numbers travel, not 86 M
    assert sum(p.numel() for p in model.parameters()) > 85_000_000  # the frozen backbone stays home

    images, labels = next(iter(task.load_train_partition(0, 20)))
    assert images.shape == (2, 3, 224, 224) and labels.dtype == torch.long and labels.max() < 102
    backbone_before = model.encoder.layers[0].mlp[0].weight.detach().clone()
    metrics = task.train(model, task.load_train_partition(0, 20), epochs=1, lr=0.1, device="cpu")
    assert metrics["num-examples"] == 2 and np.isfinite(metrics["train-loss"])
    assert torch.equal(model.encoder.layers[0].mlp[0].weight, backbone_before)
    assert not np.allclose(task.get_arrays(model)[0], arrays[0])  # the head moved

    # The server's global head goes into a fresh model on another node.
    other = task.build_model()
    task.set_arrays(other, task.get_arrays(model))
    assert torch.equal(other.heads.head.weight, model.heads.head.weight)
    result = task.evaluate(other, task.load_test_split(), device="cpu")
    assert result["num-examples"] == 8 and 0.0 <= result["accuracy"] <= 1.0


def test_vit_flowers_loads_imagenet_weights_through_torch_hub_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default weights go the real way (torchvision -> torch.hub), from a cache the test fills."""
    from torchvision.models import vit_b_16

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    problem = VitFlowersTask.data_problem({})  # no data, no weights, no network
    assert problem and "Hugging Face Hub" in problem
    workload_data.flowers(tmp_path / "flowers", train=2, test=2)
    options = {"data_files": str(tmp_path / "flowers")}
    problem = VitFlowersTask.data_problem(options)
    if problem is not None:  # only when download.pytorch.org cannot be reached, as in CI
        assert WEIGHTS_URL in problem and str(checkpoints) in problem and "weights=none" in problem
    assert VitFlowersTask.data_problem({**options, "weights": "none"}) is None

    pretrained = vit_b_16()
    with torch.no_grad():
        pretrained.conv_proj.weight.fill_(0.25)  # a mark to find after loading
    checkpoints.mkdir(parents=True)
    torch.save(pretrained.state_dict(), checkpoints / WEIGHTS_URL.rsplit("/", 1)[1])
    del pretrained
    assert VitFlowersTask.data_problem(options) is None
    model = VitFlowersTask(**options).build_model()
    assert torch.all(model.conv_proj.weight == 0.25)
    assert model.heads.head.out_features == 102


# --- text-imdb ----------------------------------------------------------------------


def test_text_imdb_from_local_parquet_and_a_saved_model(data: dict[str, Path]) -> None:
    task = load_task("text-imdb", {"data_files": str(data["imdb"]), "model": str(data["bert"]), "batch_size": "8",
                                   "max_length": "32"})
    assert [len(task.partition(i, 3)) for i in range(3)] == [16, 16, 16]
    batch, labels = next(iter(task.load_train_partition(0, 3)))
    assert batch["input_ids"].shape[0] == 8 and batch["input_ids"].shape[1] <= 32 and set(labels.tolist()) <= {0, 1}

    model = task.build_model()
    arrays = task.get_arrays(model)
    assert sum(a.size for a in arrays) == sum(p.numel() for p in model.parameters())  # all of it trains and travels
    metrics = task.train(model, task.load_train_partition(0, 3), epochs=1, lr=0.05, device="cpu")
    assert metrics["num-examples"] == 16 and np.isfinite(metrics["train-loss"])
    result = task.evaluate(model, task.load_test_split(), device="cpu")
    assert result["num-examples"] == 16  # the test split only, not the unlabelled one


def test_text_imdb_names_what_is_missing(data: dict[str, Path], tmp_path: Path) -> None:
    assert data_problem("text-imdb", {"data_files": str(data["imdb"]), "model": str(data["bert"])}) is None
    missing_model = data_problem("text-imdb", {"data_files": str(data["imdb"]), "model": str(tmp_path / "no-bert")})
    assert missing_model == f"task text-imdb: model directory {tmp_path / 'no-bert'} not found"
    hub_model = data_problem("text-imdb", {"data_files": str(data["imdb"])})
    assert hub_model and "prajjwal1/bert-tiny" in hub_model and "--task-option model=DIR" in hub_model
    assert data_problem("text-imdb", {"colour": "red"}) == "task 'text-imdb' got unknown option(s): colour"


# --- discovery ----------------------------------------------------------------------


def test_tasks_registered_by_other_packages_are_found_by_name(tmp_path: Path) -> None:
    """An installed distribution's entry point in the group fedgpu.tasks names a task."""
    site = tmp_path / "site"
    (site / "my_tasks").mkdir(parents=True)
    (site / "my_tasks" / "__init__.py").write_text(
        "from fedgpu.tasks.digits import DigitsTask\n\nclass SmallDigits(DigitsTask):\n    name = 'small-digits'\n")
    dist = site / "my_tasks-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-tasks\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[fedgpu.tasks]\nsmall-digits = my_tasks:SmallDigits\n")
    code = ("from fedgpu.tasks import load_task, resolve_task\n"
            "print(resolve_task('small-digits'), type(load_task('small-digits')).__name__)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.stdout.split() == ["my_tasks:SmallDigits", "SmallDigits"], done.stderr
    assert "small-digits" not in installed_tasks()  # not in this process's path
    assert resolve_task("vit-flowers") == "fedgpu.tasks.vit_flowers:VitFlowersTask"


# --- one federated round per task, through ./run.sh ---------------------------------


FEDERATED_ROUNDS = {
    "cifar10": lambda d: ["--data-files", str(d["cifar10"])],
    "vit-flowers": lambda d: ["--data-files", str(d["flowers"]), "--task-option", "weights=none", "--batch-size", "2"],
    "text-imdb": lambda d: ["--data-files", str(d["imdb"]), "--task-option", f"model={d['bert']}",
                            "--task-option", "max_length=32", "--batch-size", "8"],
}


@pytest.mark.parametrize("task", list(FEDERATED_ROUNDS))
@pytest.mark.e2e
@pytest.mark.slow
def test_one_federated_round_on_cpu(task: str, data: dict[str, Path], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    code, output, _ = run_federation(run_dir, "2", "2", "2", "1", "--task", task, "--local-epochs", "1",
                                     "--lr", "0.01", *FEDERATED_ROUNDS[task](data), timeout=600)
    assert code == 0, output[-4000:]
    (row,) = read_metrics(run_dir)
    assert (int(row["results"]), int(row["failures"])) == (2, 0), row
    assert np.isfinite(float(row["server_loss"])) and 0.0 <= float(row["server_accuracy"]) <= 1.0


# --- bench-models -------------------------------------------------------------------


def bench_models(tmp_path: Path, models: str, batches: int) -> tuple[subprocess.CompletedProcess, dict[str, dict]]:
    """`fedgpu bench-models` on small CPU batches, as a user runs it; its CSV rows by model."""
    out = tmp_path / "zoo.csv"
    done = subprocess.run(
        [str(FEDGPU), "bench-models", "--models", models, "--batches", str(batches), "--batch-size", "2",
         "--image-size", "32", "--device", "cpu", "--threads", "1", "--csv", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    return done, {row["model"]: row for row in csv.DictReader(out.open())}


def test_bench_models_times_each_model_in_its_own_child(tmp_path: Path) -> None:
    done, rows = bench_models(tmp_path, "resnet18,vit_tiny_16", batches=2)
    assert done.returncode == 0, done.stderr
    assert set(rows) == {"resnet18", "vit_tiny_16"}
    from torchvision.models import resnet18

    assert int(rows["resnet18"]["params"]) == sum(p.numel() for p in resnet18().parameters())
    assert int(rows["resnet18"]["head_params"]) == 512 * 1000 + 1000  # fc
    assert int(rows["vit_tiny_16"]["head_params"]) == 192 * 1000 + 1000  # heads.head
    for row in rows.values():
        assert row["device"] == "cpu" and row["peak_source"] == "rss" and row["error"] == ""
        assert float(row["train_s"]) > 0 and float(row["finetune_s"]) > 0
        assert float(row["train_median_s"]) <= float(row["train_s"])
        # Each child imported torch itself: its own RSS peak, far above the parent's (which never imports torch).
        assert float(row["peak_mib"]) > 200
    for model in rows:
        assert any(line.startswith(model) for line in done.stdout.splitlines()), done.stdout


def test_bench_models_reports_a_model_that_fails_and_goes_on(tmp_path: Path) -> None:
    """A model that cannot run (Inception-v3 on images smaller than its kernels) is a row with its error."""
    done, rows = bench_models(tmp_path, "inception_v3,mobilenet_v3_small", batches=1)
    assert done.returncode == 1, done.stderr
    assert "Kernel size can't be greater than actual input size" in rows["inception_v3"]["error"]
    assert rows["inception_v3"]["params"] == ""
    assert rows["mobilenet_v3_small"]["error"] == "" and float(rows["mobilenet_v3_small"]["train_s"]) > 0
    assert re.search(r"^inception_v3 +failed: ", done.stdout, re.M), done.stdout


# --- each task's own learning rate and epochs ---------------------------------------

TASK_OPTIONS = {
    "digits": lambda d: {},
    "cifar10": lambda d: {"data_files": str(d["cifar10"])},
    "vit-flowers": lambda d: {"data_files": str(d["flowers"]), "weights": "none", "batch_size": "2"},
    "text-imdb": lambda d: {"data_files": str(d["imdb"]), "model": str(d["bert"]), "max_length": "32",
                            "batch_size": "8"},
}


@pytest.mark.parametrize("task", list(TASK_OPTIONS))
def test_a_task_trains_with_its_own_lr_and_epochs_unless_the_run_says(task: str, data: dict[str, Path]) -> None:
    from fedgpu.tasks.work import WorkSettings, initial_arrays, train_partition

    settings = WorkSettings(task, TASK_OPTIONS[task](data), device="cpu")
    declared = load_task(task, TASK_OPTIONS[task](data))
    arrays = list(initial_arrays(settings).values())
    # lr and epochs 0: what a run that does not set them sends (RunSettings' defaults).
    _, metrics, _ = train_partition(settings, arrays, 0, 2, epochs=0, lr=0.0, lr_scale=0.5)
    assert (metrics["lr"], metrics["local-epochs"]) == (declared.default_lr * 0.5, declared.default_local_epochs)
    _, metrics, _ = train_partition(settings, arrays, 0, 2, epochs=2, lr=0.2)
    assert (metrics["lr"], metrics["local-epochs"]) == (0.2, 2)


def test_a_run_that_sets_no_lr_leaves_it_to_the_task() -> None:
    from fedgpu.flower.settings import RunSettings

    run = RunSettings.from_run_config(RunSettings(task="cifar10").to_run_config())
    assert (run.lr, run.local_epochs) == (0.0, 0)
    assert [run.round_lr_scale(r) for r in (1, 2)] == [1.0, 1.0]
    assert RunSettings(lr_decay=0.5).round_lr_scale(3) == 0.25
