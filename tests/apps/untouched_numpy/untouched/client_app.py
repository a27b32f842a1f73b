"""Each node moves the model towards its own partition id; evaluation reports the distance."""

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from untouched.model import target_of

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    (weights,) = msg.content["arrays"].to_numpy_ndarrays()
    lr = float(msg.content["config"]["lr"])
    updated = weights + lr * (target_of(context.node_config) - weights)
    metrics = MetricRecord({"num-examples": 10})
    return Message(RecordDict({"arrays": ArrayRecord([updated]), "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    (weights,) = msg.content["arrays"].to_numpy_ndarrays()
    distance = float(np.abs(target_of(context.node_config) - weights).sum())
    metrics = MetricRecord({"distance": distance, "num-examples": 10})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
