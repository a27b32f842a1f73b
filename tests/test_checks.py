"""CheckedStrategy around Flower's own FedAvg: a bad reply is one failure, the rest aggregate.
Seconds-valued options: finite and sane, or one line and exit 2 before anything starts."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedgpu.flower import CheckedStrategy
from fedgpu.flower.failures import Failure

from helpers import FEDGPU

MODEL = {"conv1.weight": np.zeros((4, 1, 3, 3), np.float32), "fc.bias": np.zeros(10, np.float32)}


@pytest.fixture(autouse=True)
def every_test_in_a_run(in_a_run: None) -> None:
    """Every test here makes Flower messages (the shared ``in_a_run`` fixture)."""


def _record(arrays: dict) -> ArrayRecord:
    return ArrayRecord({name: Array(value) for name, value in arrays.items()})


def _reply(node: int, arrays: dict, examples=10) -> Message:
    instruction = Message(RecordDict(), dst_node_id=node, message_type="train")
    content = RecordDict({"arrays": _record(arrays), "metrics": MetricRecord({"num-examples": examples, "loss": 0.5})})
    return Message(content, reply_to=instruction)


def _replies() -> list[Message]:
    good = [_reply(node, {name: np.full_like(v, node) for name, v in MODEL.items()}) for node in (1, 2)]
    bad_shape = _reply(3, {"conv1.weight": np.zeros((2, 2), np.float32), "fc.bias": MODEL["fc.bias"]})
    no_examples = _reply(4, dict(MODEL), examples=0)
    return [*good, bad_shape, no_examples]


def test_flowers_fedavg_alone_fails_the_round_on_one_bad_reply() -> None:
    with pytest.raises(ValueError, match="broadcast"):
        FedAvg().aggregate_train(1, _replies())


def test_checked_fedavg_aggregates_the_good_replies_and_names_the_bad_ones() -> None:
    seen = []
    strategy = CheckedStrategy(FedAvg(),
                               on_bad_reply=lambda rnd, reply, why: seen.append((rnd, reply.metadata.src_node_id, why)))
    strategy.configure_train(1, _record(MODEL), ConfigRecord(), grid=_NoGrid())  # the round's global model
    arrays, metrics = strategy.aggregate_train(1, _replies())
    assert np.allclose(arrays["conv1.weight"].numpy(), 1.5) and np.allclose(arrays["fc.bias"].numpy(), 1.5)
    assert metrics["loss"] == 0.5
    assert seen == [
        (1, 3, "array 'conv1.weight' has shape (2, 2), expected (4, 1, 3, 3)"),
        (1, 4, "'num-examples' is 0, expected a positive integer"),
    ]
    checked = strategy.checked(1, _replies(), _record(MODEL))
    failures = [Failure.from_error(reply.error) for reply in checked if reply.has_error()]
    assert [(f.kind, f.round) for f in failures] == [("bad reply", 1), ("bad reply", 1)]
    assert [reply.metadata.src_node_id for reply in checked] == [1, 2, 3, 4]  # still from the same nodes
    assert strategy.fraction_train == FedAvg().fraction_train  # the wrapped strategy's own settings show through


class _NoGrid:
    """FedAvg's configure_train asks the grid for its nodes (and waits for at least two)."""

    def get_node_ids(self):
        return [1, 2, 3, 4]


CLIENT = ["client", "--mp", "--superlink", "127.0.0.1:9", "--partition-id", "0", "--num-partitions", "2"]
BAD_SECONDS = [
    (["run", "2", "2", "1", "1", "--timeout", "nan"], "'--timeout': 'nan' is not a finite number of seconds"),
    (["run", "2", "2", "1", "1", "--message-timeout", "1e-300"],
     "'--message-timeout': 1e-300 s is too short: at least 10 s"),
    (["run", "2", "2", "1", "1", "--message-timeout", "9.5"], "'--message-timeout': 9.5 s is too short: at least 10 s"),
    (["run", "2", "2", "1", "1", "--start-timeout", "inf"],
     "'--start-timeout': 'inf' is not a finite number of seconds"),
    (["run", "2", "2", "1", "1", "--admission-timeout", "0.001"],
     "'--admission-timeout': 0.001 s is too short: at least 1 s"),
    (["run", "2", "2", "1", "1", "--timeout", "1e12"], "'--timeout': 1e+12 s is too long: at most 2592000 s (30 days)"),
    (["run", "2", "2", "1", "1", "--lr", "nan"], "'--lr': 'nan' is not a finite number"),
    (["server", "--message-timeout", "NaN"], "'--message-timeout': 'NaN' is not a finite number of seconds"),
    ([*CLIENT, "--timeout", "1e-300"], "'--timeout': 1e-300 s is too short: at least 1 s"),
    ([*CLIENT, "--max-wait-time", "nan"], "'--max-wait-time': 'nan' is not a finite number of seconds"),
]


@pytest.mark.parametrize(("args", "message"), BAD_SECONDS, ids=[" ".join(a) for a, _ in BAD_SECONDS])
def test_a_timeout_that_is_not_a_sane_number_of_seconds_is_one_line_and_exit_2(
    tmp_path: Path, args: list[str], message: str
) -> None:
    run_dir = tmp_path / "run"
    extra = ["--run-dir", str(run_dir)] if args[0] in ("run", "server") else []
    done = subprocess.run([str(FEDGPU), *args, *extra, "--check"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert not run_dir.exists(), "nothing is created for bad input"


def test_the_least_sane_timeouts_pass_the_check(tmp_path: Path) -> None:
    done = subprocess.run(
        [str(FEDGPU), "run", "2", "2", "1", "1", "--message-timeout", "10", "--timeout", "1", "--start-timeout", "1",
         "--admission-timeout", "1", "--run-dir", str(tmp_path / "run"), "--check"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
