"""Flower's FedAvg on one small array, every node trained and evaluated each round; each reply's metrics in
replies.jsonl."""

import json

import numpy as np
from flwr.app import ArrayRecord, Context, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

app = ServerApp()
REPLIES = "replies.jsonl"  # in the ServerApp's working directory


def recorded(kind: str):
    def aggregate(records: list[RecordDict], weighting_key: str) -> MetricRecord:
        with open(REPLIES, "a") as out:
            for record in records:
                out.write(json.dumps({"type": kind, **dict(record["metrics"])}) + "\n")
        return aggregate_metricrecords(records, weighting_key)

    return aggregate


@app.main()
def main(grid: Grid, context: Context) -> None:
    nodes = int(context.run_config["min-nodes"])
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=nodes, min_evaluate_nodes=nodes,
                      min_available_nodes=nodes, train_metrics_aggr_fn=recorded("train"),
                      evaluate_metrics_aggr_fn=recorded("evaluate"))
    strategy.start(grid=grid, initial_arrays=ArrayRecord([np.zeros(4)]),
                   num_rounds=int(context.run_config["num-server-rounds"]))
