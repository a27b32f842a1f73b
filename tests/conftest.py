"""Fixtures shared by the tests: a fake GPU host, a Flower run's identity."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from helpers import FAKE_GPU_DIR, load_fake_pynvml


@pytest.fixture
def fake_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Returns a function that declares the host's GPUs; the fake pynvml serves them."""
    nvml_dir = tmp_path / "nvml"
    nvml_dir.mkdir()
    monkeypatch.setenv("FAKE_NVML_DIR", str(nvml_dir))
    monkeypatch.setenv("FEDGPU_LEDGER", str(tmp_path / "ledger"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(FAKE_GPU_DIR), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setitem(sys.modules, "pynvml", load_fake_pynvml())

    def declare(*gpus: dict) -> Path:
        (nvml_dir / "gpus.json").write_text(json.dumps(list(gpus)))
        return nvml_dir

    return declare


@pytest.fixture
def in_a_run():
    """Messages are made inside a Flower run: a task identity as the runtime would set it."""
    from fedgpu.flower.transfer import adopt_task_identity, task_identity

    saved = task_identity()
    adopt_task_identity((7, 1, 1))
    yield
    adopt_task_identity(saved)


# Test cost by marker: a file's weight is what its tests are marked (see pyproject's markers).
_WEIGHT = {"slow": 4.0, "e2e": 2.0}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The heaviest files first, each file's tests kept together and in order.

    ``launchers/test.sh`` runs whole files on two workers in collection order
    (``--dist loadfile --no-loadscope-reorder``): a long file left for the end
    would run alone while the other worker idles. Federations (``e2e``, most of
    all ``slow``) cost seconds each, other tests a fraction of one.
    """
    weight: dict[str, float] = {}
    first: dict[str, int] = {}
    for index, item in enumerate(items):
        path = item.nodeid.split("::", 1)[0]
        first.setdefault(path, index)
        marks = [name for name in _WEIGHT if item.get_closest_marker(name)]
        weight[path] = weight.get(path, 0.0) + (max(_WEIGHT[name] for name in marks) if marks else 0.05)
    items.sort(key=lambda item: (-weight[item.nodeid.split("::", 1)[0]], first[item.nodeid.split("::", 1)[0]]))
