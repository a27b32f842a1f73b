"""A ClientApp that adds one to every array; the run config can make it raise."""

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    fail = int(context.run_config["fail-partition"])
    partition = int(context.node_config["partition-id"])
    if fail == -2 or fail == partition:
        raise ValueError(f"injected: partition {partition} cannot train")
    arrays = [array + 1.0 for array in msg.content["arrays"].to_numpy_ndarrays()]
    metrics = MetricRecord({"train-loss": float(partition), "num-examples": 10})
    return Message(content=RecordDict({"arrays": ArrayRecord(arrays), "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    weights = msg.content["arrays"].to_numpy_ndarrays()
    metrics = MetricRecord({"eval-loss": float(np.mean(weights[0])), "num-examples": 10})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
