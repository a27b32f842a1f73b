"""roundsbad: Flower's stock FedAvg, as an app written without fedgpu in mind has it."""

import numpy as np
from flwr.app import Array, ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    strategy = FedAvg(fraction_evaluate=0.0, min_available_nodes=2)
    strategy.start(grid=grid, initial_arrays=ArrayRecord({"w": Array(np.zeros(2))}),
                   num_rounds=context.run_config["num-server-rounds"])
