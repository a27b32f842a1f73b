"""roundsbad: client 1 replies with an array of 3 values where the model has 2."""

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    (weights,) = msg.content["arrays"].to_numpy_ndarrays()
    if context.node_config["partition-id"] == 1:
        weights = np.zeros(3)  # the bug: a model of another shape
    arrays = ArrayRecord({"w": Array(weights + 1)})
    metrics = MetricRecord({"train_loss": 0.5, "num-examples": 10})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)
