"""Fixtures shared by the tests: a fake GPU host, a Flower run's identity; the slowest files first."""

from __future__ import annotations

import collections
import json
import os
import sys
from pathlib import Path

import pytest

from helpers import FAKE_GPU_DIR, load_fake_pynvml

# Seconds each test file took (calls, setups and teardowns), as measured by --record-file-seconds.
FILE_SECONDS = Path(__file__).with_name("file_seconds.json")
UNMEASURED_E2E_SECONDS = 40.0  # a file not measured yet: this much per test that starts a federation


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--record-file-seconds", action="store_true",
                     help=f"write each test file's seconds to {FILE_SECONDS.name} (the order files are run in)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest files first, each file's tests in their own order.

    xdist hands out whole files (--dist loadfile, --no-loadscope-reorder): a
    three-minute file started last would leave the other workers idle at the end.
    """
    try:
        measured = json.loads(FILE_SECONDS.read_text())
    except (OSError, ValueError):
        measured = {}
    guessed: collections.Counter[str] = collections.Counter()
    for item in items:
        if item.get_closest_marker("e2e"):
            guessed[item.location[0]] += UNMEASURED_E2E_SECONDS

    def seconds(item: pytest.Item) -> float:
        path = item.location[0]
        return float(measured.get(path, guessed[path]))

    items.sort(key=lambda item: -seconds(item))  # stable: a file's tests keep their order


_file_seconds: collections.Counter[str] = collections.Counter()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _file_seconds[report.location[0]] += report.duration  # under xdist: in the controller, for every worker


def pytest_sessionfinish(session: pytest.Session) -> None:
    if session.config.getoption("record_file_seconds") and not hasattr(session.config, "workerinput"):
        ordered = {path: round(seconds, 1) for path, seconds in sorted(_file_seconds.items(), key=lambda kv: -kv[1])}
        FILE_SECONDS.write_text(json.dumps(ordered, indent=1) + "\n")


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
