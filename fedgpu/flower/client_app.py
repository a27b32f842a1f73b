"""The fedgpu ClientApp: train and evaluate a fedgpu Task on this node's partition.

Runs wherever the node's runner puts it: in a short-lived child (``--mp``) or
in the node's own process (the baseline). torch is imported by the task work
functions when they run, never when this module is imported.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedgpu.flower.records import named_record
from fedgpu.flower.settings import RunSettings
from fedgpu.tasks.work import evaluate_partition, train_partition

app = ClientApp()
WARNINGS_RECORD = "warnings"  # what the run should know, e.g. a partition smaller than one batch


def _settings(context: Context) -> RunSettings:
    settings = RunSettings.from_run_config(dict(context.run_config))
    served = context.node_config.get("task")
    if served is not None and served != settings.task:
        raise ValueError(f"this node serves task {served!r}; the run asks for {settings.task!r}")
    return settings


def _partition(context: Context) -> tuple[int, int]:
    return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])


@app.train()
def train(msg: Message, context: Context) -> Message:
    settings = _settings(context)
    config = msg.content["config"]
    arrays, metrics, warnings = train_partition(
        settings.work(),
        msg.content["arrays"].to_numpy_ndarrays(),
        *_partition(context),
        epochs=int(config["local-epochs"]),
        lr=float(config["lr"]),
        lr_scale=float(config.get("lr-scale", 1.0)),
    )
    # The reply names its arrays as the server did: the server checks them by name.
    content = RecordDict({"arrays": named_record(arrays, list(msg.content["arrays"].keys())),
                          "metrics": MetricRecord(metrics)})
    if warnings:
        content[WARNINGS_RECORD] = ConfigRecord({str(i): text for i, text in enumerate(warnings)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    settings = _settings(context)
    metrics = evaluate_partition(settings.work(), msg.content["arrays"].to_numpy_ndarrays(), *_partition(context))
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
