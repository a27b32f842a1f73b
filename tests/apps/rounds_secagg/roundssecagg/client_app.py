"""roundssecagg: a NumPyClient behind Flower's secaggplus_mod."""

from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common import Context

from roundssecagg.task import load_data, mse, step


class LinearClient(NumPyClient):
    def __init__(self, partition_id: int) -> None:
        self.x, self.y = load_data(partition_id)

    def fit(self, parameters, config):
        weights = step(parameters[0], self.x, self.y)
        return [weights], len(self.y), {"train_mse": mse(weights, self.x, self.y)}

    def evaluate(self, parameters, config):
        loss = mse(parameters[0], self.x, self.y)
        return loss, len(self.y), {"mse": loss}


def client_fn(context: Context):
    return LinearClient(int(context.node_config["partition-id"])).to_client()


app = ClientApp(client_fn=client_fn, mods=[secaggplus_mod])
