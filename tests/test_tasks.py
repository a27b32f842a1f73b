"""Tests for fedgpu.tasks: name resolution, digits and cifar10 (offline)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

# Hub access must fail fast instead of retrying for ~30 s; only tests set this
# (it takes effect if `datasets` was not imported before this module).
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch

from fedgpu.tasks import BUILTIN_TASKS, UnknownTaskError, load_task, resolve_task
from fedgpu.tasks.cifar10 import Cifar10Task
from fedgpu.tasks.digits import DigitsTask

REPO_ROOT = Path(__file__).resolve().parents[1]

torch.set_num_threads(1)


# --- resolution ---------------------------------------------------------------


def test_resolve_builtin_names() -> None:
    assert resolve_task("digits") == "fedgpu.tasks.digits:DigitsTask"
    assert resolve_task("cifar10") == "fedgpu.tasks.cifar10:Cifar10Task"
    assert resolve_task("vit-flowers") == "fedgpu.tasks.vit_flowers:VitFlowersTask"
    assert resolve_task("text-imdb") == "fedgpu.tasks.text_imdb:TextImdbTask"
    assert set(BUILTIN_TASKS) == {"digits", "cifar10", "vit-flowers", "text-imdb"}


def test_resolve_user_reference() -> None:
    ref = "fedgpu.tasks.digits:DigitsTask"
    assert resolve_task(ref) == ref


@pytest.mark.parametrize("bad", ["bogus", "nosuch.module:X", "fedgpu.tasks.nosuch:X"])
def test_resolve_rejects_unknown(bad: str) -> None:
    with pytest.raises(UnknownTaskError) as excinfo:
        resolve_task(bad)
    message = str(excinfo.value)
    assert repr(bad) in message
    assert "cifar10, digits" in message
    assert "\n" not in message


def test_load_task_passes_options_and_rejects_unknown_ones() -> None:
    task = load_task("digits", {"seed": 3, "partitioner": "dirichlet"})
    assert isinstance(task, DigitsTask)
    assert (task.seed, task.partitioner) == (3, "dirichlet")
    with pytest.raises(TypeError, match="colour"):
        load_task("digits", {"colour": "blue"})
    with pytest.raises(ValueError, match="'zipf'"):
        DigitsTask(partitioner="zipf")
    with pytest.raises(UnknownTaskError, match="NoSuchClass"):
        load_task("fedgpu.tasks.digits:NoSuchClass")


def test_import_tasks_does_not_import_torch() -> None:
    code = (
        "import sys, fedgpu.tasks\n"
        "fedgpu.tasks.resolve_task('digits')\n"
        "fedgpu.tasks.resolve_task('fedgpu.tasks.cifar10:Cifar10Task')\n"
        "for name in fedgpu.tasks.BUILTIN_TASKS:\n"  # what the server's --check asks of each, parent side
        "    fedgpu.tasks.data_problem(name, {'data_files': '/nonexistent'})\n"
        "import fedgpu.bench_models, fedgpu.zoo\n"
        # Every module of the parent side: client node, server, ServerApp, launchers' helpers, reports.
        "import fedgpu.cli, fedgpu.capacity, fedgpu.output, fedgpu.slurm, fedgpu.launch\n"
        "import fedgpu.owner_only, fedgpu.private_dirs, fedgpu.run_dir, fedgpu.flower.internals, "
        "fedgpu.monitor.run_files\n"
        "import fedgpu.flower.node, fedgpu.flower.runner, fedgpu.flower.server, fedgpu.flower.server_app\n"
        "import fedgpu.flower.client_app, fedgpu.flower.checks, fedgpu.flower.failures, fedgpu.flower.recorder\n"
        "import fedgpu.monitor.memory, fedgpu.monitor.summary, fedgpu.monitor.report, fedgpu.monitor.host\n"
        "import fedgpu.nvml.placement, fedgpu.isolation.zygote.server, fedgpu.isolation.zygote.caller\n"
        "import fedgpu.flower.superlink, fedgpu.flower.server_plan, fedgpu.flower.run_reports, fedgpu.names, "
        "fedgpu.net\n"
        "import fedgpu.isolation.zygote.start, fedgpu.isolation.zygote.warm, fedgpu.isolation.zygote.forked\n"
        "import fedgpu.isolation.zygote.handshake\n"
        "heavy = {'torch', 'torchvision', 'datasets', 'flwr_datasets', 'sklearn', 'transformers'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == "[]"


# --- digits ---------------------------------------------------------------------


def row_keys(dataset) -> list[tuple]:
    """Rows as hashable (pixels, label) tuples, to compare splits by content."""
    return [tuple(p) + (label,) for p, label in zip(dataset["pixels"], dataset["label"])]


def test_digits_iid_partitions_cover_train_split_disjointly() -> None:
    task = DigitsTask()
    train = task.train_dataset()
    parts = [task.partition(i, 7) for i in range(7)]
    sizes = [len(p) for p in parts]
    assert sum(sizes) == len(train)
    assert max(sizes) - min(sizes) <= 1
    all_rows = [row for p in parts for row in row_keys(p)]
    assert sorted(all_rows) == sorted(row_keys(train))


def test_digits_dirichlet_partitions_are_skewed_and_cover_train_split() -> None:
    task = DigitsTask(partitioner="dirichlet", alpha=0.3)
    train = task.train_dataset()
    parts = [task.partition(i, 5) for i in range(5)]
    assert sorted(r for p in parts for r in row_keys(p)) == sorted(row_keys(train))
    histograms = np.array([np.bincount(p["label"], minlength=10) for p in parts])
    shares = histograms / histograms.sum(axis=1, keepdims=True)
    # IID shares would all be ~0.1; Dirichlet(0.3) makes them far apart.
    assert np.abs(shares - shares.mean(axis=0)).max() > 0.1


def test_digits_test_split_is_fixed_and_disjoint_from_train() -> None:
    first, second = DigitsTask(seed=1), DigitsTask(seed=2)
    assert row_keys(first.test_dataset()) == row_keys(second.test_dataset())
    assert len(first.test_dataset()) == 360 and len(first.train_dataset()) == 1437
    assert not set(row_keys(first.test_dataset())) & set(row_keys(first.train_dataset()))
    # Per-class counts of a stratified split: every digit present.
    assert np.bincount(first.test_dataset()["label"]).min() >= 35


def test_digits_model_is_deterministic_and_arrays_round_trip() -> None:
    task = DigitsTask()
    model, other = task.build_model(), DigitsTask(seed=7).build_model()
    arrays = task.get_arrays(model)
    assert all(isinstance(a, np.ndarray) for a in arrays)
    assert all(np.array_equal(a, b) for a, b in zip(arrays, task.get_arrays(task.build_model())))
    assert not np.array_equal(arrays[0], task.get_arrays(other)[0])

    task.set_arrays(other, arrays)
    assert all(np.array_equal(a, b) for a, b in zip(arrays, task.get_arrays(other)))
    arrays[0][...] = 0  # returned arrays are copies, not views of the weights
    assert not np.array_equal(arrays[0], task.get_arrays(model)[0])


def test_digits_set_arrays_rejects_mismatch() -> None:
    task = DigitsTask()
    model = task.build_model()
    arrays = task.get_arrays(model)
    with pytest.raises(ValueError, match="expects"):
        task.set_arrays(model, arrays[:-1])
    wrong_shape = [*arrays[:-1], np.zeros((3, 3), dtype=np.float32)]
    with pytest.raises(ValueError, match="shape"):
        task.set_arrays(model, wrong_shape)


def test_digits_train_lowers_loss_and_evaluate_is_sane() -> None:
    task = DigitsTask()
    model = task.build_model()
    data = task.load_train_partition(0, 3)
    before = task.evaluate(model, data, device="cpu")
    result = task.train(model, data, epochs=3, lr=task.default_lr, device="cpu")
    after = task.evaluate(model, data, device="cpu")
    assert result["num-examples"] == len(task.partition(0, 3))
    assert result["train-loss"] < before["loss"]
    assert after["loss"] < before["loss"]

    test = task.evaluate(model, task.load_test_split(), device="cpu")
    assert test["num-examples"] == 360
    assert 0.0 <= test["accuracy"] <= 1.0
    assert test["accuracy"] > 0.5


# --- cifar10 --------------------------------------------------------------------


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny local dataset with CIFAR-10's schema, written as parquet."""
    import datasets
    from PIL import Image

    directory = tmp_path_factory.mktemp("cifar10")
    rng = np.random.default_rng(0)
    features = datasets.Features(
        {"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)}
    )
    for split, size in (("train", 64), ("test", 32)):
        images = [
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
            for _ in range(size)
        ]
        labels = [i % 10 for i in range(size)]
        dataset = datasets.Dataset.from_dict({"img": images, "label": labels}, features=features)
        dataset.to_parquet(str(directory / f"{split}.parquet"))
    return directory


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the Arrow files `datasets` derives from parquet out of ~/.cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def test_cifar10_model_has_quickstart_parameter_count() -> None:
    model = Cifar10Task().build_model()
    assert sum(p.numel() for p in model.parameters()) == 62006
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_cifar10_from_local_parquet(cifar_dir: Path) -> None:
    task = Cifar10Task(data_files=str(cifar_dir), batch_size=16)
    sizes = [len(task.partition(i, 2)) for i in range(2)]
    assert sizes == [32, 32]

    model = task.build_model()
    data = task.load_train_partition(0, 2)
    images, labels = next(iter(data))
    assert images.shape == (16, 3, 32, 32) and labels.dtype == torch.long
    assert -1.0 <= images.min() and images.max() <= 1.0  # quickstart normalisation

    result = task.train(model, data, epochs=1, lr=0.01, device="cpu")
    assert result["num-examples"] == 32 and np.isfinite(result["train-loss"])
    metrics = task.evaluate(model, task.load_test_split(), device="cpu")
    assert metrics["num-examples"] == 32
    assert 0.0 <= metrics["accuracy"] <= 1.0 and np.isfinite(metrics["loss"])


def test_cifar10_comma_list_of_files(cifar_dir: Path) -> None:
    files = f"{cifar_dir / 'train.parquet'},{cifar_dir / 'test.parquet'}"
    task = Cifar10Task(data_files=files)
    assert len(task.test_dataset()) == 32


def test_cifar10_missing_data_files_is_clear(cifar_dir: Path, tmp_path: Path) -> None:
    only_train = tmp_path / "only-train"
    only_train.mkdir()
    shutil.copy(cifar_dir / "train.parquet", only_train)
    with pytest.raises(FileNotFoundError, match=r"no test\*\.parquet"):
        Cifar10Task(data_files=str(only_train)).partition(0, 2)
    with pytest.raises(FileNotFoundError, match="nowhere.parquet"):
        Cifar10Task(data_files=str(tmp_path / "nowhere.parquet")).partition(0, 2)


def test_cifar10_hub_failure_is_one_clear_error(tmp_path: Path) -> None:
    # A fresh process, so the offline switch holds whatever was imported here.
    code = "from fedgpu.tasks import load_task\nload_task('cifar10').load_test_split()\n"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(tmp_path),
    }
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("RuntimeError: cifar10:")
    assert "data_files" in last_line
    assert "During handling" not in result.stderr  # no chained traceback
