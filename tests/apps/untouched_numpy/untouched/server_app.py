"""FedAvg over every node, as many rounds as the run config says."""

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from untouched.model import initial

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rounds = context.run_config["num-server-rounds"]
    strategy = FedAvg(min_train_nodes=2, min_evaluate_nodes=2, min_available_nodes=2)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord([initial()]), num_rounds=rounds,
                            train_config=ConfigRecord({"lr": context.run_config["learning-rate"]}))
    (weights,) = result.arrays.to_numpy_ndarrays()
    print(f"untouched-numpy final weights {weights.tolist()}")
