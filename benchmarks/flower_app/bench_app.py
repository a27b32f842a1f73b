"""N sequential train messages to one node; each reply says what it cost.

The ClientApp trains the digits task for one epoch on partition 0 of 10 and
reports the seconds inside the training call, its pid and when it returned.
The ServerApp times each message's round trip and writes all of it as JSON.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server = ServerApp()
client = ClientApp()


@client.train()
def train(msg: Message, context: Context) -> Message:
    from fedgpu.tasks.work import WorkSettings, train_partition

    arrays = msg.content["arrays"].to_numpy_ndarrays()
    started = time.perf_counter()
    new_arrays, _, _ = train_partition(WorkSettings("digits"), arrays, 0, 10, epochs=1, lr=0.05)
    work = time.perf_counter() - started
    metrics = MetricRecord({"work-seconds": work, "pid": os.getpid(), "returned-at": time.time()})
    return Message(RecordDict({"arrays": ArrayRecord(new_arrays), "metrics": metrics}), reply_to=msg)


@server.main()
def main(grid: Grid, context: Context) -> None:
    config = context.run_config
    with np.load(str(config["weights"])) as saved:
        arrays = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    while not (nodes := list(grid.get_node_ids())):
        time.sleep(0.2)
    results = []
    for index in range(int(config["messages"])):
        content = RecordDict({"arrays": ArrayRecord(arrays), "config": ConfigRecord({"index": index})})
        message = Message(content, dst_node_id=nodes[0], message_type="train")
        sent = time.time()
        (reply,) = grid.send_and_receive([message], timeout=900)
        received = time.time()
        entry = {"index": index, "sent-at": sent, "received-at": received, "round-trip": received - sent}
        if reply.has_error():
            entry["error"] = reply.error.reason
        else:
            entry.update(reply.content["metrics"])
            if "fedgpu" in reply.content:  # a fedgpu node says what the call cost it
                entry["call-seconds"] = reply.content["fedgpu"]["call-seconds"]
        results.append(entry)
    with open(str(config["out"]), "w") as out:
        json.dump(results, out, indent=1)
