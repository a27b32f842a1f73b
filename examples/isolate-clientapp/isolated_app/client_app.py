"""The ClientApp: plain PyTorch on this node's share of the digits.

The only fedgpu line is ``@isolate(preload=PRELOAD)`` under each
``@app.train()`` / ``@app.evaluate()``: every call then runs in a fresh child
process, forked from a zygote that imported torch and scikit-learn once, does
the work and exits, handing back the reply and ``context.state``. The process
that hosts the ClientApp (a ``flwr-clientapp``, a Simulation Engine actor) never
imports torch, so nothing it allocated (a CUDA context, cached GPU memory)
outlives the call.
"""

from __future__ import annotations

import os

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedgpu.flower import isolate
from isolated_app import task

app = ClientApp()

# What every call would import afresh (torch, and scikit-learn for the data: seconds of CPU each time);
# the zygote imports it once and each call's child starts with it.
PRELOAD = ("torch", "sklearn.datasets", "sklearn.model_selection")


def _build_model(arrays: list):
    import torch
    from torch import nn

    model = nn.Sequential(nn.Linear(64, task.HIDDEN), nn.ReLU(), nn.Linear(task.HIDDEN, task.CLASSES))
    state = {key: torch.from_numpy(array.copy()) for key, array in zip(model.state_dict(), arrays, strict=True)}
    model.load_state_dict(state)
    return model


def _partition(context: Context, split: str):
    import torch

    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    x, y = task.load_partition(partition_id, num_partitions, split)
    return partition_id, torch.from_numpy(x), torch.from_numpy(y)


def _child_facts() -> dict[str, int]:
    """Where this call ran: the test checks that every call had its own child."""
    return {"pid": os.getpid(), "isolated": int(os.environ.get("FEDGPU_ISOLATED_CALL") == "1")}


@app.train()
@isolate(preload=PRELOAD)
def train(msg: Message, context: Context) -> Message:
    import torch
    from torch import nn

    torch.set_num_threads(1)
    config = msg.content["config"]
    torch.manual_seed(int(context.run_config["seed"]) + int(config["server-round"]))
    model = _build_model(msg.content["arrays"].to_numpy_ndarrays())
    partition_id, x, y = _partition(context, "train")
    optimizer = torch.optim.SGD(model.parameters(), lr=float(config["lr"]), momentum=0.9)
    batch_size = int(config["batch-size"])
    model.train()
    total_loss, seen = 0.0, 0
    for _ in range(int(config["local-epochs"])):
        for batch in torch.randperm(len(y)).split(batch_size):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(batch)
            seen += len(batch)

    # context.state is kept by the SuperNode across calls; it comes back from the child.
    calls = context.state.get("example")
    count = int(calls["train-calls"]) + 1 if calls is not None else 1
    context.state["example"] = MetricRecord({"train-calls": count})

    arrays = [tensor.detach().numpy() for tensor in model.state_dict().values()]
    metrics = {
        "train-loss": total_loss / max(seen, 1),
        "num-examples": len(y),
        "partition-id": partition_id,
        "train-calls": count,
        **_child_facts(),
    }
    content = RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
@isolate(preload=PRELOAD)
def evaluate(msg: Message, context: Context) -> Message:
    import torch
    from torch import nn

    torch.set_num_threads(1)
    model = _build_model(msg.content["arrays"].to_numpy_ndarrays())
    partition_id, x, y = _partition(context, "test")
    model.eval()
    with torch.no_grad():
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y).item()
        accuracy = (logits.argmax(dim=1) == y).float().mean().item()
    metrics = {
        "loss": loss,
        "accuracy": accuracy,
        "num-examples": len(y),
        "partition-id": partition_id,
        **_child_facts(),
    }
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
