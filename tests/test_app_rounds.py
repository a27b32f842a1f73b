"""A user's app counted by Flower's server round, whatever its workflow; its metrics.csv, round lines, model.npz.

Three small NumPy apps in tests/apps, each run once with real processes
(SuperLink, zygote, nodes, `flwr run`) and shared by the assertions on it:

* rounds_secagg: Flower's secure-aggregation pattern (``LegacyContext`` +
  ``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))``, a ClientApp with
  ``secaggplus_mod``): four train stages per round, each naming its round only
  in the message's group_id; its metrics come from the legacy ``History``;
* rounds_multi: a ServerApp with a loop of its own, three send_and_receive
  calls per round;
* rounds_badreply: Flower's stock FedAvg, and one client whose reply has an
  array of another shape (red-team finding H1).

The unit tests use real Flower objects: messages, a legacy History.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.server import History

from helpers import FEDGPU, ROOT, read_metrics, run_federation_command

APPS = ROOT / "tests" / "apps"


def run_app(tmp_path_factory: pytest.TempPathFactory, name: str, nodes: int) -> tuple[int, str, Path]:
    """(exit code, console, run directory) of `fedgpu run` on a copy of tests/apps/NAME."""
    base = tmp_path_factory.mktemp(name)
    app = base / "app"
    shutil.copytree(APPS / name, app, ignore=shutil.ignore_patterns("__pycache__"))
    run_dir = base / "run"
    code, output, _ = run_federation_command(
        [str(FEDGPU), "run", str(app), "--nodes", str(nodes), "--run-dir", str(run_dir)], run_dir, timeout=600)
    return code, output, run_dir


@pytest.fixture(scope="module")
def secagg(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str, Path]:
    return run_app(tmp_path_factory, "rounds_secagg", nodes=3)


@pytest.fixture(scope="module")
def multi(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str, Path]:
    return run_app(tmp_path_factory, "rounds_multi", nodes=2)


def report_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "report.json").read_text())


# -- unit: the round a message names -----------------------------------------------------------


def test_a_messages_round_comes_from_its_config_or_else_its_group_id(in_a_run: None) -> None:
    from fedgpu.flower.app_rounds import server_round_of

    strategy_style = Message(RecordDict({"config": ConfigRecord({"server-round": 4})}), dst_node_id=1,
                             message_type="train")
    legacy_style = Message(RecordDict({"fitins.config": ConfigRecord({})}), dst_node_id=1, message_type="train",
                           group_id="3")
    both = Message(RecordDict({"config": ConfigRecord({"server-round": 2})}), dst_node_id=1, message_type="train",
                   group_id="7")
    neither = Message(RecordDict({"config": ConfigRecord({"lr": 0.1})}), dst_node_id=1, message_type="query",
                      group_id="stage-a")
    assert [server_round_of(m) for m in (strategy_style, legacy_style, both, neither)] == [4, 3, 2, None]


def test_a_legacy_history_gives_each_rounds_metric_columns() -> None:
    from fedgpu.flower.app_rounds import history_columns

    history = History()
    history.add_loss_centralized(server_round=0, loss=5.0)
    history.add_metrics_centralized(server_round=0, metrics={"acc": 0.1})
    history.add_metrics_distributed_fit(server_round=1, metrics={"train_mse": 2.5})
    history.add_loss_distributed(server_round=1, loss=2.0)
    history.add_metrics_distributed(server_round=1, metrics={"mse": 2.0})
    history.add_loss_centralized(server_round=1, loss=3.0)
    history.add_metrics_centralized(server_round=1, metrics={"acc": 0.4})
    assert history_columns(history, 0) == {"server_loss": 5.0, "server_acc": 0.1}
    assert history_columns(history, 1) == {"train_train_mse": 2.5, "evaluate_loss": 2.0, "evaluate_mse": 2.0,
                                           "server_loss": 3.0, "server_acc": 0.4}
    assert history_columns(history, 2) == {}


def test_metrics_csv_widens_when_a_later_round_reports_a_new_key(tmp_path: Path) -> None:
    from fedgpu.flower.app_rounds import AppRounds

    said: list[str] = []
    rounds = AppRounds(tmp_path, num_rounds=2, say=said.append)
    rounds.aggregated(0, "server", MetricRecord({"accuracy": 0.1}))
    rounds.begin(1)
    rounds.aggregated(1, "train", MetricRecord({"loss": 0.5}))
    rounds.begin(2)  # ends round 1
    rounds.aggregated(2, "train", MetricRecord({"loss": 0.25}))
    rounds.aggregated(2, "server", MetricRecord({"accuracy": 0.75}))
    rounds.close()
    rows = read_metrics(tmp_path)
    assert [(r["round"], r["train_loss"], r["server_accuracy"]) for r in rows] == [("1", "0.5", ""),
                                                                                 ("2", "0.25", "0.75")]
    assert list(rows[0]) == ["round", "train_loss", "server_accuracy", "results", "failures", "round_seconds",
                             "failure_reasons"]
    assert said[0] == "[fedgpu] initial model: server accuracy 0.1"
    assert said[1].startswith("[fedgpu] round 1/2: train loss 0.5 | 0 results, 0 failures | ")
    assert said[2].startswith("[fedgpu] round 2/2: train loss 0.25 | server accuracy 0.75 | 0 results, 0 failures | ")


def test_the_replies_stock_fedavg_cannot_aggregate_are_named_with_what_is_wrong(in_a_run: None) -> None:
    """Both ways Flower's FedAvg fails a round: an extra array (InconsistentMessageReplies), a shape (ValueError)."""
    from flwr.app import Array, ArrayRecord
    from flwr.serverapp.exception import InconsistentMessageReplies
    from flwr.serverapp.strategy import FedAvg

    from fedgpu.flower.app_rounds import diagnose_replies

    def reply(node: int, arrays: dict) -> Message:
        instruction = Message(RecordDict(), dst_node_id=node, message_type="train")
        record = ArrayRecord({name: Array(value) for name, value in arrays.items()})
        return Message(RecordDict({"arrays": record, "metrics": MetricRecord({"num-examples": 10})}),
                       reply_to=instruction)

    model = ArrayRecord({"w": Array(np.zeros(2))})
    good = reply(1, {"w": np.ones(2)})
    extra, shape = reply(2, {"w": np.ones(2), "b": np.ones(1)}), reply(3, {"w": np.ones(3)})
    for bad, error, problem in ((extra, InconsistentMessageReplies, "2 arrays, expected 1: unexpected array 'b'"),
                                (shape, ValueError, "array 'w' has shape (3,), expected (2,)")):
        with pytest.raises(error):  # what the app's own strategy does with them
            FedAvg().aggregate_train(1, [good, bad])
        assert diagnose_replies([good, bad], model, "num-examples") == [(bad, problem)]


def test_the_flower_hooked_is_the_one_installed_and_hooking_it_imports_no_torch() -> None:
    """The contract of fedgpu.flower.internals' ServerApp hooks; another Flower fails here, not in a user's run."""
    code = ("import sys\nfrom fedgpu.flower.internals import app_rounds_contract\n"
            "print(app_rounds_contract(), sorted({'torch', 'torchvision'} & set(sys.modules)))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[] []", done.stdout + done.stderr


# -- Flower's secure-aggregation pattern: a legacy workflow, several stages per round ----------


@pytest.mark.e2e
@pytest.mark.slow
def test_secagg_rounds_hold_their_messages(secagg: tuple[int, str, Path]) -> None:
    code, output, run_dir = secagg
    assert code == 0, output
    rounds = report_of(run_dir)["rounds"]
    assert [entry["round"] for entry in rounds] == [1, 2, 3], [entry["round"] for entry in rounds]
    for entry in rounds:
        # SecAgg+: setup, share keys, masked vectors, unmask: four train messages per node; one evaluate each.
        assert entry["sent"] == {"train": 12, "evaluate": 3} and not entry["failed_messages"], entry
    assert "[fedgpu] failures: none of 45 messages in 3 rounds" in output, output
    memory = json.loads((run_dir / "memory.json").read_text())
    assert [entry["round"] for entry in memory["rounds"]] == [1, 2, 3]


@pytest.mark.e2e
@pytest.mark.slow
def test_secagg_rounds_get_their_history_in_metrics_csv_and_on_the_console(secagg: tuple[int, str, Path]) -> None:
    code, output, run_dir = secagg
    assert code == 0, output
    rows = read_metrics(run_dir)
    assert [row["round"] for row in rows] == ["1", "2", "3"]
    assert list(rows[0]) == ["round", "train_train_mse", "evaluate_loss", "evaluate_mse", "server_loss",
                             "server_central_mse", "results", "failures", "round_seconds", "failure_reasons"]
    assert all(row["results"] == "15" and row["failures"] == "0" and float(row["round_seconds"]) > 0 for row in rows)
    # The model learns: the central loss falls round after round, from the initial one.
    report = report_of(run_dir)
    losses = [report["initial"]["server_loss"]] + [float(row["server_loss"]) for row in rows]
    assert losses == sorted(losses, reverse=True), losses
    assert [entry["metrics"]["server_loss"] for entry in report["rounds"]] == losses[1:]
    for number in (1, 2, 3):
        assert f"[fedgpu] round {number}/3: train train_mse " in output, output
    assert "[fedgpu] initial model: server loss " in output
    with np.load(run_dir / "model.npz") as model:
        assert [model[name].shape for name in model.files] == [(3,)]


# -- a ServerApp of its own loop: several messages per round -------------------------------


@pytest.mark.e2e
@pytest.mark.slow
def test_several_messages_per_round_land_in_their_round(multi: tuple[int, str, Path]) -> None:
    code, output, run_dir = multi
    assert code == 0, output
    rounds = report_of(run_dir)["rounds"]
    assert [(entry["round"], entry["sent"]) for entry in rounds] == [(1, {"train": 4, "evaluate": 2}),
                                                                    (2, {"train": 4, "evaluate": 2})], rounds
    assert "[fedgpu] failures: none of 12 messages in 2 rounds" in output, output
    assert [entry["round"] for entry in json.loads((run_dir / "memory.json").read_text())["rounds"]] == [1, 2]
    rows = read_metrics(run_dir)
    assert [(row["round"], row["results"], row["failures"]) for row in rows] == [("1", "6", "0"), ("2", "6", "0")]
    assert "[fedgpu] round 1/2: 6 results, 0 failures | " in output and "[fedgpu] round 2/2: 6 results" in output
    assert not (run_dir / "model.npz").exists()  # no strategy returned arrays


# -- red team H1: a bad reply under the app's own FedAvg ------------------------------------


@pytest.mark.e2e
def test_a_bad_reply_under_stock_fedavg_is_named_with_its_client_and_reason(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    code, output, run_dir = run_app(tmp_path_factory, "rounds_badreply", nodes=2)
    assert code == 1, output  # Flower's FedAvg cannot aggregate it: the run fails, as the app has it
    problem = "array 'w' has shape (3,), expected (2,)"
    assert "[fedgpu] round 1: bad reply from client 1 (node " in output and f"(train): {problem}" in output, output
    assert "[fedgpu] round 1: FedAvg.aggregate_train raised ValueError: " in output, output
    assert "[fedgpu] failures: 1 of 2 messages, in 1 of 1 rounds" in output, output
    assert "[fedgpu]   bad reply x1: round 1 train client 1" in output, output
    report = report_of(run_dir)
    assert report["status"] == "failed"
    failure = report["failure"]
    assert failure["kind"] == "aggregation failed" and "bad reply from client 1" in failure["detail"], failure
    (entry,) = report["rounds"]
    (failed,) = entry["failed_messages"]
    assert (failed["client"], failed["kind"], failed["detail"]) == ("1", "bad reply", problem), failed
    assert [m["client"] for m in entry["messages"]] == ["0"], entry["messages"]
    (row,) = read_metrics(run_dir)
    assert (row["results"], row["failures"], row["failure_reasons"]) == ("1", "1", "bad reply x1"), row


def test_a_server_fn_apps_history_gives_its_rounds_metrics(tmp_path: Path) -> None:
    """A legacy app built with ``ServerApp(server_fn=...)``: Flower's ``Server.fit`` keeps its metrics in a
    History it makes itself; the hook installed in the ServerApp process finds it (in a fresh process:
    the hooks patch Flower's classes)."""
    script = f"""
import os, sys
os.environ["FEDGPU_RUN_DIR"] = {str(tmp_path)!r}
from fedgpu.flower import internals
from fedgpu.flower.app_rounds import AppRounds
assert internals.record_app_rounds(print)
from flwr.server import History
from fedgpu.flower.internals import round_hooks
rounds = round_hooks._app_rounds = AppRounds({str(tmp_path)!r}, 1, say=print)
history = History()  # as Server.fit makes it
assert rounds.history is history
rounds.begin(1)
history.add_loss_distributed(server_round=1, loss=0.25)
history.add_metrics_distributed_fit(server_round=1, metrics={{"mse": 0.5}})
rounds.end()
History()  # a second one (another fit) is not taken instead
assert rounds.history is history
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "[fedgpu] round 1/1" in done.stdout, done.stdout
    rows = read_metrics(tmp_path)
    assert [(row["round"], row["train_mse"], row["evaluate_loss"]) for row in rows] == [("1", "0.5", "0.25")]


def test_the_failure_summary_counts_only_numbered_rounds(tmp_path: Path) -> None:
    """Messages outside Flower's rounds (a legacy workflow's round 0, an own loop that names none) are counted
    as messages, not as rounds, and their failures are placed, not sorted into a crash."""
    from fedgpu.flower.recorder import failure_summary

    def entry(number, failed_client=None):
        failed = [{"type": "train", "kind": "raised ValueError", "client": failed_client}] if failed_client else []
        return {"round": number, "sent": {"train": 2}, "failed_messages": failed}

    report = {"rounds": [entry(0), entry(1, "1"), entry(2), entry(None, "0")]}
    lines = failure_summary(report, tmp_path)
    assert lines[0] == "[fedgpu] failures: 2 of 8 messages, in 1 of 2 rounds", lines
    assert lines[1] == ("[fedgpu]   raised ValueError x2: round 1 train client 1; "
                        "outside the rounds train client 0"), lines
    assert failure_summary({"rounds": [entry(0), entry(1), entry(2)]}, tmp_path)[0] == \
        "[fedgpu] failures: none of 6 messages in 2 rounds"
