"""A ClientApp that counts its calls in ``context.state`` and says which process ran each one.

Flower keeps a node's Context from message to message (its ``state`` is how
Flower's advanced-pytorch keeps a model head between rounds). The count lives
there, in a MetricRecord; a module global counts the calls made in this
process, which is 1 where every message gets a fresh process.
"""

import os

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()
STATE = "call-counts"
calls_in_this_process = 0


def _count(msg: Message, context: Context, kind: str) -> MetricRecord:
    global calls_in_this_process
    calls_in_this_process += 1
    counts = context.state.get(STATE, MetricRecord({"calls": 0, "train": 0, "evaluate": 0}))
    counts["calls"] = int(counts["calls"]) + 1
    counts[kind] = int(counts[kind]) + 1
    context.state[STATE] = counts
    return MetricRecord({
        "calls": counts["calls"],
        f"{kind}-calls": counts[kind],
        "calls-in-this-process": calls_in_this_process,
        "pid": os.getpid(),
        "partition": int(context.node_config["partition-id"]),
        "round": int(msg.content["config"]["server-round"]),
        "num-examples": 1,
    })


@app.train()
def train(msg: Message, context: Context) -> Message:
    metrics = _count(msg, context, "train")
    arrays = [array + 1.0 for array in msg.content["arrays"].to_numpy_ndarrays()]
    return Message(content=RecordDict({"arrays": ArrayRecord(arrays), "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    metrics = _count(msg, context, "evaluate")
    metrics["eval-mean"] = float(np.mean(msg.content["arrays"].to_numpy_ndarrays()[0]))
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
