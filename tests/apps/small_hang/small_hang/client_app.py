"""Train: add 1 to every array; on the node whose partition-id is the run's ``hang-on-partition``, never return."""

import time

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    if context.node_config["partition-id"] == context.run_config["hang-on-partition"]:
        while True:  # a ClientApp that hangs (a dead lock, a stuck device): only its deadline ends it
            time.sleep(3600)
    arrays = [array + 1.0 for array in msg.content["arrays"].to_numpy_ndarrays()]
    content = RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord({"num-examples": 10})})
    return Message(content=content, reply_to=msg)
