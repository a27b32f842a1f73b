"""roundsmulti: a loop of its own, no strategy: per round two train steps and an evaluate."""

import time

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


def send(grid: Grid, nodes, kind: str, arrays: ArrayRecord, config: dict):
    messages = [Message(RecordDict({"arrays": arrays, "config": ConfigRecord(config)}), dst_node_id=node,
                        message_type=kind) for node in nodes]
    replies = list(grid.send_and_receive(messages, timeout=300))
    assert len(replies) == len(messages) and not any(reply.has_error() for reply in replies), replies
    return replies


@app.main()
def main(grid: Grid, context: Context) -> None:
    arrays = ArrayRecord([np.zeros(2)])
    nodes = []
    while len(nodes) < 2:  # every node up
        nodes = sorted(grid.get_node_ids())
        time.sleep(0.2)
    for server_round in range(1, context.run_config["num-server-rounds"] + 1):
        for step in (1, 2):
            replies = send(grid, nodes, MessageType.TRAIN, arrays, {"server-round": server_round, "step": step})
            arrays = replies[0].content["arrays"]
        send(grid, nodes, MessageType.EVALUATE, arrays, {"server-round": server_round})
    print(f"final arrays: {arrays.to_numpy_ndarrays()[0].tolist()}")
