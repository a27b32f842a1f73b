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
