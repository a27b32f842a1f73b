"""Per-message overhead of isolation: none, spawn, zygote, and Flower's own default.

The same call everywhere: one epoch of the digits task on partition 0 of 10
(``fedgpu.tasks.work.train_partition``). Its cost in a warm process (mode none,
after the first call) is the *work*; whatever a mode adds on top is overhead:
starting the child, the imports a fresh process pays, moving the weights, exiting.

Part 1, the isolation core alone: ``Isolator(mode).run(train_partition, ...)``
timed by the caller (child start to result back).

Part 2, inside Flower: a plain Flower app (``benchmarks/flower_app``) sends N
train messages one after another to one node, on a fresh SuperLink per mode:
  * ``flower-subprocess``: ``flower-supernode`` as shipped (``--isolation
    subprocess``: one ``flwr-clientapp`` process per message);
  * ``fedgpu-zygote`` / ``fedgpu-spawn`` / ``fedgpu-none``: ``fedgpu client``.
The node-side cost of a message: for Flower's own node, the lifetime of its
``flwr-clientapp`` process (a watcher sees it start and exit, via pidfd); for
fedgpu nodes, the task runner's ``Isolator.run`` (child asked for, reply back,
child reaped), reported in each reply. (A zygote child's own lifetime means
little: the spare was forked ahead of the call.) Overhead = that - warm work.
The ServerApp's round trip per message is reported too: it adds the runtime's
polling (seconds), the same for all modes.

    .venv/bin/python benchmarks/overhead.py [--calls 10] [--messages 6]
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from fedgpu.flower.server_plan import ServerSettings  # noqa: E402
from fedgpu.flower.superlink import superlink_command, write_connection  # noqa: E402
from fedgpu.flower.warm_ups import zygote_warm_ups  # noqa: E402
from fedgpu.isolation import Isolator  # noqa: E402
from fedgpu.isolation.procs import stop_tree  # noqa: E402
from fedgpu.names import DOORBELLS_ENV, PACE_ENV  # noqa: E402
from fedgpu.net import free_port, wait_for_health  # noqa: E402
from fedgpu.tasks.work import WorkSettings, initial_arrays, train_partition  # noqa: E402

from common import child_pids, median, report, table  # noqa: E402

BIN = Path(sys.executable).parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
QUIET = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "HF_DATASETS_OFFLINE": "1",
         "HF_HUB_OFFLINE": "1"}


def train_call(arrays: list[np.ndarray]) -> list[np.ndarray]:
    return train_partition(WorkSettings("digits"), arrays, 0, 10, epochs=1, lr=0.05)[0]


# -- part 1: the isolation core -----------------------------------------------


def core_overheads(arrays: list[np.ndarray], calls: int) -> dict[str, list[dict[str, float]]]:
    samples: dict[str, list[dict[str, float]]] = {}
    for mode in ("none", "spawn", "zygote"):
        kwargs = {"warm_ups": zygote_warm_ups("digits")} if mode == "zygote" else {}
        with Isolator(mode, **kwargs) as iso:
            if mode == "zygote":
                iso.run(len, ((),), timeout=600)  # wait for the zygote's warm-up outside the timing
            runs = []
            for _ in range(calls + (1 if mode == "none" else 0)):
                started = time.perf_counter()
                outcome = iso.run(train_call, (arrays,), timeout=600)
                runs.append({"wall": time.perf_counter() - started, "work": outcome.work_seconds})
            samples[mode] = runs[1:] if mode == "none" else runs  # none: drop the cold first call
        print(f"core {mode}: {median(r['wall'] for r in samples[mode]):.3f} s per call", file=sys.stderr, flush=True)
    return samples


# -- part 2: inside Flower ------------------------------------------------------


def _since_boot() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def _start_time(pid: int) -> float | None:
    """Seconds since boot at which ``pid`` started (the kernel's clock-tick resolution)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[19]) / CLOCK_TICKS
    except (OSError, IndexError, ValueError):
        return None


class LifetimeWatcher(threading.Thread):
    """Start and exit times of every process below ``roots`` whose command line matches."""

    def __init__(self, roots: list[int], match: str) -> None:
        super().__init__(daemon=True)
        self.roots, self.match = roots, match
        self.started: dict[int, float] = {}
        self.exited: dict[int, float] = {}
        self._pidfds: dict[int, int] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            stack = list(self.roots)
            while stack:
                pid = stack.pop()
                kids = child_pids(pid)
                stack += kids
                for kid in kids:
                    if kid in self.started:
                        continue
                    try:
                        cmdline = Path(f"/proc/{kid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                        pidfd = os.pidfd_open(kid)
                    except OSError:
                        continue
                    if self.match in cmdline and (begun := _start_time(kid)) is not None:
                        self.started[kid] = begun
                        self._pidfds[kid] = pidfd
                    else:
                        os.close(pidfd)
            ready = select.select(list(self._pidfds.values()), [], [], 0.005)[0] if self._pidfds else []
            now = _since_boot()
            for pid, fd in list(self._pidfds.items()):
                if fd in ready:
                    self.exited[pid] = now
                    os.close(self._pidfds.pop(pid))
            if not self._pidfds:
                time.sleep(0.005)

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def lifetime(self, pid: int) -> float | None:
        if pid in self.started and pid in self.exited:
            return self.exited[pid] - self.started[pid]
        return None


FLOWER_PACE = " (Flower's pace)"  # the same node and SuperLink with FEDGPU_NODE_PACE=flower: the "before"


def flower_run(mode: str, messages: int, weights: Path, work_dir: Path) -> list[dict]:
    """One SuperLink, one node of ``mode``, ``messages`` train messages; per-message facts."""
    env = {**os.environ, **QUIET, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    doorbells = tempfile.mkdtemp(prefix="fedgpu-bench-bells-")
    env[DOORBELLS_ENV] = doorbells  # as `fedgpu run` does: the SuperLink rings the node
    if mode.endswith(FLOWER_PACE):
        mode, env[PACE_ENV] = mode[: -len(FLOWER_PACE)], "flower"
    label = mode + (FLOWER_PACE if env.get(PACE_ENV) == "flower" else "")
    slug = mode + ("-flower-pace" if env.get(PACE_ENV) == "flower" else "")
    port, node_port = free_port(), free_port()
    server = ServerSettings(port=port)
    home = work_dir / f"{slug}-home"
    write_connection(home, server)
    env_server = {**env, "FLWR_HOME": str(home)}
    processes: list[subprocess.Popen] = []
    log = open(work_dir / f"{slug}.log", "w")
    zygote_dir = None
    try:
        processes.append(subprocess.Popen(superlink_command(server), env=env_server, stdout=log,
                                          stderr=subprocess.STDOUT))
        if not wait_for_health(f"http://127.0.0.1:{port}/health", 60, alive=lambda: processes[0].poll() is None):
            raise RuntimeError(f"SuperLink did not start; see {log.name}")
        superlink = f"127.0.0.1:{port}"
        node_env = {**env, "FLWR_HOME": str(work_dir / f"{slug}-node-home")}
        roots, match = [], ""
        if mode == "flower-subprocess":
            command = [str(BIN / "flower-supernode"), "--insecure", "--superlink", superlink, "--port", str(node_port),
                       "--node-config", "partition-id=0 num-partitions=10"]
            match = "flwr-clientapp"
        else:
            command = [str(BIN / "fedgpu"), "client", "--superlink", superlink, "--partition-id", "0",
                       "--num-partitions", "10"]
            if mode == "fedgpu-none":
                command.append("--no-mp")
            else:
                command += ["--mp", "--isolation", mode.split("-")[1]]
            if mode == "fedgpu-zygote":
                zygote_dir = tempfile.mkdtemp(prefix="fedgpu-bench-zygote-")
                zygote = subprocess.Popen([str(BIN / "fedgpu"), "zygote", "--dir", zygote_dir, "--task", "digits"],
                                          env=env, stdout=log, stderr=subprocess.STDOUT)
                processes.append(zygote)
                while not Path(zygote_dir, "ready").exists():
                    assert zygote.poll() is None, f"zygote exited; see {log.name}"
                    time.sleep(0.1)
                command += ["--zygote", zygote_dir]
                roots, match = [zygote.pid], "fedgpu.isolation.zygote"
            elif mode == "fedgpu-spawn":
                match = "fedgpu.isolation.child"
        node = subprocess.Popen(command, env=node_env, stdout=log, stderr=subprocess.STDOUT)
        processes.append(node)
        watcher = LifetimeWatcher(roots or [node.pid], match) if match else None
        if watcher:
            watcher.start()
        out = work_dir / f"{slug}.json"
        config = f'messages={messages} weights="{weights}" out="{out}"'
        subprocess.run([str(BIN / "flwr"), "run", str(HERE / "flower_app"), "fedgpu", "--run-config", config,
                        "--stream"],
                       env=env_server, stdout=log, stderr=subprocess.STDOUT, timeout=3600, check=False)
        if watcher:
            time.sleep(1.0)  # let the last child's exit be seen
            watcher.stop()
        results = json.loads(out.read_text())
        for entry in results:
            if "error" in entry:
                raise RuntimeError(f"{mode}: message {entry['index']} failed: {entry['error']}")
            pid = int(entry["pid"])
            entry["lifetime"] = watcher.lifetime(pid) if watcher else None
        print(f"flower {label}: {median(e['round-trip'] for e in results):.2f} s round trip", file=sys.stderr,
              flush=True)
        return results
    finally:
        for proc in reversed(processes):
            stop_tree(proc.pid, 5.0)
            proc.wait()
        log.close()
        if zygote_dir:
            shutil.rmtree(zygote_dir, ignore_errors=True)
        shutil.rmtree(doorbells, ignore_errors=True)


def _beyond_work(results: list[dict]) -> float:
    return median(e["round-trip"] - e["work-seconds"] for e in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=10, help="calls per mode through the isolation core")
    parser.add_argument("--messages", type=int, default=6, help="messages per mode through Flower")
    args = parser.parse_args()
    with Isolator("spawn") as iso:
        arrays = list(iso.run(initial_arrays, (WorkSettings("digits"),), timeout=600).value.values())

    core = core_overheads(arrays, args.calls)
    warm = median(r["wall"] for r in core["none"])
    rows = []
    for mode in ("none", "spawn", "zygote"):
        wall = median(r["wall"] for r in core[mode])
        rows.append([mode, wall, wall - warm, median(r["wall"] - r["work"] for r in core[mode])])
    zygote_overhead = rows[2][2]
    part1 = table(["mode", "call s (median)", "overhead s (call - warm work)",
                   "child start + transfer s (call - work inside)"], rows)

    work_dir = Path(tempfile.mkdtemp(prefix="fedgpu-bench-overhead-"))
    weights = work_dir / "weights.npz"
    np.savez(weights, *arrays)
    flower: dict[str, list[dict]] = {}
    for mode in ("fedgpu-none", "fedgpu-zygote", "fedgpu-spawn", "flower-subprocess", "fedgpu-zygote" + FLOWER_PACE):
        flower[mode] = flower_run(mode, args.messages, weights, work_dir)
    node_warm = median(e["work-seconds"] for e in flower["fedgpu-none"][1:])
    rows2, overheads = [], {}
    for mode, results in flower.items():
        lifetimes = [e["lifetime"] for e in results if e["lifetime"] is not None]
        calls = [e["call-seconds"] for e in results if "call-seconds" in e]
        cost = median(lifetimes) if mode == "flower-subprocess" else (median(calls) if mode != "fedgpu-none" else None)
        overhead = cost - node_warm if cost is not None else 0.0
        overheads[mode] = overhead
        rows2.append([
            mode,
            f"{median(lifetimes):.3f}" if lifetimes else "-",
            f"{median(calls):.3f}" if calls else "-",
            f"{overhead:.3f}" if cost is not None else "0 (in the node)",
            median(e["work-seconds"] for e in results),
            median(e["round-trip"] for e in results),
            median(e["round-trip"] - e["work-seconds"] for e in results),
        ])
    ratio = (overheads["flower-subprocess"] / overheads["fedgpu-zygote"] if overheads["fedgpu-zygote"] > 0
             else float("inf"))
    part2 = table(
        ["node", "message process lifetime s", "node's call s (start -> reply -> reaped)",
         "overhead s (cost - warm work)", "work inside s", "server round trip s", "round trip - work inside s"],
        rows2,
    )
    body = (
        "## 1. Isolation core alone\n\n" + part1 + f"\n\nWarm work (mode none, after its first call): {warm:.3f} s. "
        f"Medians of {args.calls} calls. **zygote overhead: {zygote_overhead:.3f} s per call** "
        f"(spawn: {rows[1][2]:.2f} s, {rows[1][2] / zygote_overhead:.0f}x more).\n\n"
        "## 2. Inside Flower (one node, sequential train messages)\n\n" + part2 +
        f"\n\nWarm work in the node (fedgpu-none after its first message): {node_warm:.3f} s. "
        f"Medians of {args.messages} messages. "
        f"**Flower's default subprocess isolation costs {overheads['flower-subprocess']:.2f} s per message, "
        f"{ratio:.0f}x the zygote's {overheads['fedgpu-zygote']:.3f} s.** "
        "**Round trip minus the work inside, fedgpu-zygote: "
        f"{_beyond_work(flower['fedgpu-zygote']):.2f} s per message; "
        f"at Flower's pace (FEDGPU_NODE_PACE=flower: 3 s idle pulls, 0.5 s reply turns, 3 s ServerApp pulls): "
        f"{_beyond_work(flower['fedgpu-zygote' + FLOWER_PACE]):.2f} s.** flower-subprocess is Flower's own "
        "SuperNode (its own pace) under the same SuperLink, whose ServerApp pulls are paced."
    )
    report("overhead", "Per-message overhead of isolation", body, {"core": core, "flower": flower})
    shutil.rmtree(work_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
