"""roundssecagg: legacy FedAvg under DefaultWorkflow with SecAgg+ for fit, as Flower's example has it."""

import numpy as np
from flwr.common import Context, ndarrays_to_parameters
from flwr.server import LegacyContext, ServerApp, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

from roundssecagg.task import load_data, mse


def weighted_average(metrics):
    total = sum(n for n, _ in metrics)
    return {key: sum(n * m[key] for n, m in metrics) / total for key in metrics[0][1]} if metrics else {}


def central_evaluate(server_round, parameters, config):
    x, y = load_data(partition_id=99)
    loss = mse(parameters[0], x, y)
    return loss, {"central_mse": loss}


app = ServerApp()


@app.main()
def main(grid, context: Context) -> None:
    strategy = FedAvg(
        fraction_fit=1.0,
        fraction_evaluate=1.0,
        min_fit_clients=3,
        min_evaluate_clients=3,
        min_available_clients=3,
        initial_parameters=ndarrays_to_parameters([np.zeros(3)]),
        fit_metrics_aggregation_fn=weighted_average,
        evaluate_metrics_aggregation_fn=weighted_average,
        evaluate_fn=central_evaluate,
    )
    context = LegacyContext(
        context=context,
        config=ServerConfig(num_rounds=context.run_config["num-server-rounds"]),
        strategy=strategy,
    )
    fit_workflow = SecAggPlusWorkflow(
        num_shares=context.run_config["num-shares"],
        reconstruction_threshold=context.run_config["reconstruction-threshold"],
        max_weight=context.run_config["max-weight"],
    )
    DefaultWorkflow(fit_workflow=fit_workflow)(grid, context)
