"""A ServerApp running Flower's FedAvg on one small array; the run config can make it raise or hang."""

import time

import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = context.run_config
    mode = str(config["server-mode"])
    if mode == "raise":
        raise RuntimeError("injected: the ServerApp cannot start")
    if mode == "hang":
        while True:  # a ServerApp that never returns
            time.sleep(1)
    minimum = int(config["min-nodes"])
    strategy = FedAvg(fraction_train=float(config["fraction-train"]),
                      fraction_evaluate=float(config["fraction-evaluate"]),
                      min_train_nodes=minimum, min_evaluate_nodes=minimum, min_available_nodes=minimum)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord([np.zeros(4)]),
                            num_rounds=int(config["num-server-rounds"]))
    # The arrays stay empty where every reply failed (Flower's FedAvg then has nothing to aggregate).
    print(f"life-numpy finished: train metrics of rounds {sorted(result.train_metrics_clientapp)}")
