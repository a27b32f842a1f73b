"""roundsmulti: each call adds one to the array it gets."""

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    arrays = [a + 1 for a in msg.content["arrays"].to_numpy_ndarrays()]
    metrics = MetricRecord({"step": msg.content["config"]["step"], "num-examples": 1})
    return Message(RecordDict({"arrays": ArrayRecord(arrays), "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    total = float(sum(a.sum() for a in msg.content["arrays"].to_numpy_ndarrays()))
    return Message(RecordDict({"metrics": MetricRecord({"total": total, "num-examples": 1})}), reply_to=msg)
