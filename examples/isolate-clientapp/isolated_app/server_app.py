"""The ServerApp: Flower's own FedAvg; NumPy only (this process never imports torch).

The initial weights are drawn in NumPy and the global model is evaluated on
the held-out split with a NumPy forward pass. The final metrics go to the JSON
file named by the run config key ``result-file``.
"""

from __future__ import annotations

import json
import os
import sys
import time

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from isolated_app import task

app = ServerApp()

# Facts about single replies (which child ran it): kept per node, not averaged.
PER_NODE_KEYS = ("pid", "isolated", "partition-id", "train-calls")


def aggregate_keeping_per_node(records: list[RecordDict], weighting_key: str) -> MetricRecord:
    """FedAvg's weighted average, except PER_NODE_KEYS, kept as lists ordered by partition."""
    metrics = [next(iter(record.metric_records.values())) for record in records]
    metrics.sort(key=lambda m: int(m.get("partition-id", 0)))
    averaged = aggregate_metricrecords(records, weighting_key)
    for key in PER_NODE_KEYS:
        if all(key in m for m in metrics):
            averaged[key] = [int(m[key]) for m in metrics]
    return averaged


def _as_dict(by_round: dict[int, MetricRecord]) -> dict[str, dict]:
    return {str(server_round): dict(record) for server_round, record in sorted(by_round.items())}


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = context.run_config
    num_rounds = int(config["num-server-rounds"])
    result_file = str(config.get("result-file", ""))
    x_test, y_test = task.test_split()
    started = time.monotonic()

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        loss, accuracy = task.evaluate_numpy(arrays.to_numpy_ndarrays(), x_test, y_test)
        print(f"[isolated-app] round {server_round}: global model accuracy {accuracy:.3f}, loss {loss:.3f}", flush=True)
        return MetricRecord({"loss": loss, "accuracy": accuracy})

    strategy = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=2,
        min_evaluate_nodes=2,
        min_available_nodes=2,
        train_metrics_aggr_fn=aggregate_keeping_per_node,
        evaluate_metrics_aggr_fn=aggregate_keeping_per_node,
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(task.initial_arrays(int(config["seed"]))),
        num_rounds=num_rounds,
        train_config=ConfigRecord(
            {"lr": float(config["lr"]), "local-epochs": int(config["local-epochs"]), "batch-size": int(config["batch-size"])}
        ),
        evaluate_fn=evaluate_global,
    )

    central = result.evaluate_metrics_serverapp
    summary = {
        "status": "completed",
        "run_id": context.run_id,
        "num_rounds": num_rounds,
        "seconds": round(time.monotonic() - started, 3),
        "initial_accuracy": central[0]["accuracy"],
        "final_accuracy": central[num_rounds]["accuracy"],
        "train_metrics_clientapp": _as_dict(result.train_metrics_clientapp),
        "evaluate_metrics_clientapp": _as_dict(result.evaluate_metrics_clientapp),
        "evaluate_metrics_serverapp": _as_dict(central),
        "serverapp_pid": os.getpid(),
        "serverapp_imported_torch": "torch" in sys.modules,
    }
    print(
        f"[isolated-app] done: accuracy {summary['initial_accuracy']:.3f} -> {summary['final_accuracy']:.3f} "
        f"after {num_rounds} rounds",
        flush=True,
    )
    if result_file:
        temporary = f"{result_file}.tmp"
        with open(temporary, "w") as handle:
            json.dump(summary, handle, indent=2)
        os.replace(temporary, result_file)  # never a half-written result
        print(f"[isolated-app] metrics written to {result_file}", flush=True)
