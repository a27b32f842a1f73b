"""CPU of a SuperLink and its idle client nodes: fedgpu's paced nodes against Flower's own pace.

N ``fedgpu client --mp`` nodes sharing one zygote register with one SuperLink
(started as fedgpu starts it, with doorbells) and no run is submitted: every
node only polls. After they all registered and settled, the CPU seconds (user +
system, from /proc) of the SuperLink (and what it started) and of the node
processes themselves (not the shared zygote) are read over a window. The same
again with ``FEDGPU_NODE_PACE=flower``: Flower's SuperNode pace (3 s idle
pulls), the "before". Both sides in one run, for each N.

    .venv/bin/python benchmarks/idle_cpu.py [--nodes 10,100] [--window 30]
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
from fedgpu.names import DOORBELLS_ENV, PACE_ENV  # noqa: E402
from fedgpu.net import free_port, wait_for_health  # noqa: E402

from common import child_pids, report, table  # noqa: E402

BIN = Path(sys.executable).parent
TICK = os.sysconf("SC_CLK_TCK")
QUIET = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


def cpu_seconds(root: int, tree: bool = True) -> float:
    """User + system CPU of ``root`` (all its threads) and, with ``tree``, its live descendants."""
    total, stack = 0.0, [root]
    while stack:
        pid = stack.pop()
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(v) for v in fields[11:13]) / TICK  # utime stime
        if tree:
            stack += child_pids(pid)
    return total


def measure(nodes: int, window: float, pace: str, work: Path) -> dict[str, float]:
    doorbells = tempfile.mkdtemp(prefix="fedgpu-bench-bells-")
    env = {**os.environ, **QUIET, DOORBELLS_ENV: doorbells, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    if pace:
        env[PACE_ENV] = pace
    port = free_port()
    log = open(work / f"{pace or 'paced'}-{nodes}.log", "w")
    procs: list[subprocess.Popen] = []
    zygote_dir = tempfile.mkdtemp(prefix="fedgpu-bench-zygote-")
    zygote = subprocess.Popen([str(BIN / "fedgpu"), "zygote", "--dir", zygote_dir], env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while not Path(zygote_dir, "ready").exists():  # one zygote for all nodes, as the launcher does
            if zygote.poll() is not None:
                raise RuntimeError(f"zygote exited; see {log.name}")
            time.sleep(0.2)
        link = subprocess.Popen(superlink_command(ServerSettings(port=port)),
                                env={**env, "FLWR_HOME": str(work / "link")},
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(link)
        if not wait_for_health(f"http://127.0.0.1:{port}/health", 60, alive=lambda: link.poll() is None):
            raise RuntimeError(f"SuperLink did not start; see {log.name}")
        logs = []
        for i in range(nodes):
            logs.append(work / f"{pace or 'paced'}-{nodes}-node-{i}.log")
            procs.append(subprocess.Popen(
                [str(BIN / "fedgpu"), "client", "--mp", "--superlink", f"127.0.0.1:{port}", "--partition-id", str(i),
                 "--num-partitions", str(nodes), "--zygote", zygote_dir],
                env=env, stdout=open(logs[-1], "w"), stderr=subprocess.STDOUT, start_new_session=True,
            ))
            if i % 8 == 7:  # in waves, as the launcher starts them
                time.sleep(2.0)
        deadline = time.monotonic() + 600
        while not all("SuperNode ID" in p.read_text() for p in logs):
            if time.monotonic() > deadline:
                raise RuntimeError("nodes did not register in 600 s")
            time.sleep(1.0)
        time.sleep(10.0)  # settled: every node at its idle interval
        def sample() -> dict[str, float]:
            return {"superlink": cpu_seconds(link.pid), "nodes": sum(cpu_seconds(p.pid, tree=False) for p in procs[1:])}

        before = sample()
        time.sleep(window)
        after = sample()
        return {k: (after[k] - before[k]) / window * 100 for k in before}  # percent of one core
    finally:
        for proc in [*procs, zygote]:
            stop_tree(proc.pid, 5.0)
        for proc in [*procs, zygote]:
            proc.wait()
        log.close()
        shutil.rmtree(zygote_dir, ignore_errors=True)
        shutil.rmtree(doorbells, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="10,100")
    parser.add_argument("--window", type=float, default=30.0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedgpu-bench-idle-cpu-"))
    rows, raw = [], {}
    for nodes in (int(n) for n in args.nodes.split(",")):
        for label, pace in (("fedgpu (paced, doorbells)", ""), ("Flower's pace (before)", "flower")):
            cpu = measure(nodes, args.window, pace, work)
            raw[f"{label} {nodes}"] = cpu
            rows.append([nodes, label, cpu["superlink"], cpu["nodes"], cpu["nodes"] / nodes])
            print(f"{nodes} nodes, {label}: {cpu}", file=sys.stderr, flush=True)
    body = table(["idle nodes", "pace", "SuperLink % of a core", "all nodes % of a core", "per node %"], rows)
    body += (f"\n\nCPU over a {args.window:g} s window after every node registered and settled, no run submitted. "
             "An idle paced node backs off to Flower's own 3 s pull and waits on its doorbell in between.")
    report("idle_cpu", "Idle CPU: SuperLink and client nodes", body, raw)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
