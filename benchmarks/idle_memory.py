"""Idle memory: each client node and the shared zygote with 10, 50 and 100 nodes connected.

One SuperLink, one shared zygote (``fedgpu zygote --task digits``) and N
``fedgpu client --mp`` nodes connected to it, started 10 at a time. Once every
node is ready and has idled for --settle seconds, RSS, PSS (shared pages split
among their users) and USS (private pages) of every process are read from
``/proc/PID/smaps_rollup`` --samples times; the table gives medians.

    .venv/bin/python benchmarks/idle_memory.py [--counts 10,50,100]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from fedgpu.flower.server_plan import ServerSettings  # noqa: E402
from fedgpu.flower.superlink import superlink_command  # noqa: E402
from fedgpu.isolation.procs import stop_tree  # noqa: E402
from fedgpu.net import free_port, wait_for_health  # noqa: E402

from common import MIB, child_pids, median, report, table  # noqa: E402

BIN = Path(sys.executable).parent
QUIET = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
READY_LINE = "SuperNode ID"  # registered with the SuperLink


def memory(pid: int) -> dict[str, float]:
    """RSS, PSS and USS of ``pid`` in MiB."""
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                values[parts[0][:-1]] = int(parts[1]) * 1024
    uss = values.get("Private_Clean", 0) + values.get("Private_Dirty", 0)
    return {"rss": values["Rss"] / MIB, "pss": values["Pss"] / MIB, "uss": uss / MIB}


def available_gib() -> float:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="10,50,100")
    parser.add_argument("--settle", type=float, default=15.0, help="seconds of idling before measuring")
    parser.add_argument("--samples", type=int, default=3)
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]

    work = Path(tempfile.mkdtemp(prefix="fedgpu-bench-idle-"))
    zygote_dir = tempfile.mkdtemp(prefix="fedgpu-bench-zygote-")
    env = {**os.environ, **QUIET, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "FLWR_HOME": str(work / "home")}
    port = free_port()
    processes: list[subprocess.Popen] = []
    nodes: list[subprocess.Popen] = []
    raw: dict[str, dict] = {}
    rows = []
    keep = False  # the logs, when something went wrong
    try:
        superlink = subprocess.Popen(superlink_command(ServerSettings(port=port)), env=env,
                                     stdout=open(work / "superlink.log", "w"), stderr=subprocess.STDOUT)
        processes.append(superlink)
        assert wait_for_health(f"http://127.0.0.1:{port}/health", 60, alive=lambda: superlink.poll() is None)
        zygote = subprocess.Popen([str(BIN / "fedgpu"), "zygote", "--dir", zygote_dir, "--task", "digits"], env=env,
                                  stdout=open(work / "zygote.log", "w"), stderr=subprocess.STDOUT)
        processes.append(zygote)
        while not Path(zygote_dir, "ready").exists():
            assert zygote.poll() is None, "zygote exited"
            time.sleep(0.2)
        for target in counts:
            while len(nodes) < target:
                batch = []
                for _ in range(min(10, target - len(nodes))):
                    index = len(nodes)
                    log = work / f"client-{index}.log"
                    node = subprocess.Popen(
                        [str(BIN / "fedgpu"), "client", "--mp", "--superlink", f"127.0.0.1:{port}",
                         "--partition-id", str(index), "--num-partitions", str(max(counts)), "--zygote", zygote_dir],
                        env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                    )
                    nodes.append(node)
                    batch.append((node, log))
                for node, log in batch:  # registered before the next batch: 2 cores, 10 imports at a time
                    while READY_LINE not in log.read_text(errors="replace"):
                        if node.poll() is not None:
                            keep = True
                            raise SystemExit(f"idle_memory: a node exited with {node.returncode}; see {log}")
                        time.sleep(0.2)
            print(f"{target} nodes ready; idling {args.settle:g} s", file=sys.stderr, flush=True)
            time.sleep(args.settle)
            samples = []
            for _ in range(args.samples):
                samples.append({
                    "nodes": [memory(n.pid) for n in nodes],
                    "zygote": memory(zygote.pid),
                    "spare": [memory(child) for child in child_pids(zygote.pid)],  # the primed spare child
                    "superlink": memory(superlink.pid),
                    "available_gib": available_gib(),
                })
                time.sleep(2.0)
            raw[str(target)] = samples
            node_rss = median(median(m["rss"] for m in s["nodes"]) for s in samples)
            node_max = median(max(m["rss"] for m in s["nodes"]) for s in samples)
            node_pss = median(median(m["pss"] for m in s["nodes"]) for s in samples)
            node_uss = median(median(m["uss"] for m in s["nodes"]) for s in samples)
            zygote_rss = median(s["zygote"]["rss"] for s in samples)
            zygote_pss = median(s["zygote"]["pss"] for s in samples)
            spare_uss = median(sum(m["uss"] for m in s["spare"]) for s in samples)
            total_pss = median(
                sum(m["pss"] for m in s["nodes"] + s["spare"]) + s["zygote"]["pss"] + s["superlink"]["pss"]
                for s in samples
            )
            rows.append([target, node_rss, node_max, node_pss, node_uss, zygote_rss, zygote_pss, spare_uss,
                         total_pss / 1024, median(s["available_gib"] for s in samples)])
    finally:
        for node in nodes:  # all at once: a hundred graceful exits one by one take minutes
            node.terminate()
        for node in nodes:
            try:
                node.wait(30)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait()
        for proc in processes[::-1]:
            stop_tree(proc.pid, 5.0)
            proc.wait()
        shutil.rmtree(zygote_dir, ignore_errors=True)
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    body = table(
        ["nodes", "node RSS MiB (median)", "node RSS MiB (max)", "node PSS MiB", "node USS MiB", "zygote RSS MiB",
         "zygote PSS MiB", "spare child USS MiB",
         "nodes + zygote + spare + SuperLink PSS GiB", "host MemAvailable GiB"],
        rows,
    )
    body += (
        f"\n\nMedians over {args.samples} samples, {args.settle:g} s after the last node was ready. "
        "RSS counts every page a process maps, shared ones included (libraries, and for the zygote its preloaded "
        "modules); PSS splits shared pages among their users, so PSS sums to the memory really used; "
        "USS is what a process alone holds."
    )
    report("idle_memory", "Idle memory of client nodes and the shared zygote", body, raw)


if __name__ == "__main__":
    main()
