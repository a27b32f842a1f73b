"""Pipe transfer: seconds and GB/s for 1, 10, 100 and 400 MB of float32 weights.

Three ways measured side by side, each the median of --repeats:
  * wire, one way: fedgpu's framing (pickle protocol 5, arrays out of band) from
    one process to another over a socketpair, as the isolation core sends them;
  * multiprocessing.Pipe, one way: the stdlib's Connection.send (arrays pickled
    in band), the usual way to hand weights to a child;
  * zygote call, in + out: a forked child receives the weights and sends them
    back (what a train call moves), timed by the caller from call sent to
    result received.

    .venv/bin/python benchmarks/transfer.py [--repeats 5] [--sizes 1,10,100,400]
"""

from __future__ import annotations

import argparse
import multiprocessing
import socket
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fedgpu.isolation import Isolator, wire

from common import median, report, table

LAYER_MB = 25  # weights come as a list of layers, not one blob


def weights(megabytes: int) -> list[np.ndarray]:
    total = megabytes * 1_000_000 // 4
    sizes = [LAYER_MB * 1_000_000 // 4] * (total // (LAYER_MB * 250_000)) + [total % (LAYER_MB * 250_000)]
    return [np.random.default_rng(i).random(n, dtype=np.float32) for i, n in enumerate(sizes) if n]


def _echo_wire(sock: socket.socket, count: int) -> None:
    for _ in range(count):
        wire.send_object(sock, ("ack", len(wire.recv_object(sock))))


def _echo_pipe(conn, count: int) -> None:
    for _ in range(count):
        conn.send(("ack", len(conn.recv())))


def one_way_wire(arrays: list[np.ndarray], repeats: int) -> list[float]:
    ours, theirs = wire.socketpair()
    child = multiprocessing.get_context("fork").Process(target=_echo_wire, args=(theirs, repeats))
    child.start()
    theirs.close()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        wire.send_object(ours, arrays)
        wire.recv_object(ours)  # the tiny ack: the receiver has it all
        seconds.append(time.perf_counter() - started)
    child.join()
    ours.close()
    return seconds


def one_way_pipe(arrays: list[np.ndarray], repeats: int) -> list[float]:
    ours, theirs = multiprocessing.Pipe()
    child = multiprocessing.get_context("fork").Process(target=_echo_pipe, args=(theirs, repeats))
    child.start()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        ours.send(arrays)
        ours.recv()
        seconds.append(time.perf_counter() - started)
    child.join()
    return seconds


def _identity(arrays: list[np.ndarray]) -> list[np.ndarray]:
    return arrays


def zygote_call(iso: Isolator, arrays: list[np.ndarray], repeats: int) -> list[float]:
    seconds = []
    for _ in range(repeats):
        outcome = iso.run(_identity, (arrays,), timeout=300)
        assert sum(a.nbytes for a in outcome.value) == sum(a.nbytes for a in arrays)
        seconds.append(outcome.seconds - outcome.work_seconds)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", default="1,10,100,400", help="megabytes, comma-separated")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    raw: dict[str, dict[str, list[float]]] = {}
    rows = []
    with Isolator("zygote", warm_ups=["numpy"]) as iso:
        for megabytes in sizes:
            arrays = weights(megabytes)
            assert sum(a.nbytes for a in arrays) == megabytes * 1_000_000
            samples = {
                "wire": one_way_wire(arrays, args.repeats),
                "pipe": one_way_pipe(arrays, args.repeats),
                "zygote_call": zygote_call(iso, arrays, args.repeats),
            }
            raw[str(megabytes)] = samples
            wire_s, pipe_s, call_s = (median(samples[k]) for k in ("wire", "pipe", "zygote_call"))
            gb = megabytes / 1000
            rows.append([megabytes, wire_s, gb / wire_s, pipe_s, gb / pipe_s, f"{pipe_s / wire_s:.1f}x", call_s,
                         2 * gb / call_s])
            print(f"{megabytes} MB done", file=sys.stderr, flush=True)
    body = table(
        ["MB", "wire s", "wire GB/s", "mp.Pipe s", "mp.Pipe GB/s", "wire vs Pipe", "zygote call in+out s",
         "call GB/s (in+out)"],
        rows,
    )
    body += (
        f"\n\nMedians of {args.repeats} transfers each. GB = 10^9 bytes. Weights are float32 arrays of at most "
        f"{LAYER_MB} MB each. The zygote call's time is the caller's (call sent to result received) minus the "
        "work inside the child; it moves the weights twice."
    )
    report("transfer", "Pipe transfer of float32 weights", body, raw)


if __name__ == "__main__":
    main()
