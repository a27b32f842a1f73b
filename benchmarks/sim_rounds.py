"""Simulation mode against Flower's Simulation Engine (Ray) and fedgpu's deployment mode, side by side in one run.

  (a) digits, 10 clients, 5 sampled, 5 rounds (fedgpu's own ServerApp and ClientApp in all):
      the Simulation Engine at its best here (client-resources num-cpus=1: one actor per core),
      the Simulation Engine as Flower ships it (num-cpus=2: one actor on 2 cores),
      ``fedgpu run --simulation`` (``--workers`` = the best actor count), and fedgpu's deployment mode;
  (b) Flower's quickstart-pytorch (examples/, offline data stand-in), 4 nodes, 4 rounds: the same four;
  (c) digits, 1000 clients, 10 sampled, 3 rounds: plain Ray (at its best) against ``fedgpu --simulation``:
      wall time, median round, peak and at-rest summed PSS of every process of the run.

Round seconds: (a) and (c) from each run's metrics.csv (the same ServerApp writes it); (b) from the time
each ``[ROUND k/R]`` line of the app's own log reached us (a round lasts until the next one's line; the
last, until the run's end). Medians over rounds 2 and later (round 1 also waits for start-up), over
``--repeats`` runs of each setup in (a) and (b), interleaved so that a slow spell of the host falls on
all of them. PSS, in (c) only (sampling it costs CPU: the kernel walks every process's page tables):
every process carrying the run's marker, summed, every 0.25 s from round 1's start to the last round's
end; "at rest" is the lowest such sample (no message in flight).

(b) also measures what quickstart-pytorch's ``load_data`` costs a message's child (its dataset is built once per
process) and prints the least ratio any runtime with a fresh process per message could reach on this app.

    .venv/bin/python benchmarks/sim_rounds.py [--only a|b|c ...] [--repeats 2] [--skip-deployment] [--keep]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from fedgpu.flower.settings import RunSettings  # noqa: E402
from fedgpu.flower.superlink import write_app  # noqa: E402
from fedgpu.monitor.host import pss_bytes  # noqa: E402

from common import BIN, MARKER, QUIET, local_simulation_env, marked, median, report, stop_marked, table  # noqa: E402

APP = ROOT / "examples" / "quickstart-pytorch"
APP_ROUND_MARK = "[ROUND "  # Flower's strategy logs it as each round begins (quickstart)
TASK_ROUND_MARK = "[fedgpu] round "  # fedgpu's ServerApp, as each round ends (digits)
MIB = 2**20


class PssSampler(threading.Thread):
    """Summed PSS of the marked processes, (time, MiB) every 0.25 s."""

    def __init__(self, marker: str) -> None:
        super().__init__(daemon=True)
        self.marker, self.samples = marker, []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(0.25):
            self.samples.append((time.monotonic(), sum(pss_bytes(pid) or 0 for pid in marked(self.marker)) / MIB))

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def peak_and_rest(self, since: float | None, until: float | None) -> tuple[float, float]:
        window = [mib for t, mib in self.samples if (since is None or t >= since) and (until is None or t <= until)]
        window = window or [mib for _, mib in self.samples] or [float("nan")]
        return max(window), min(window)


def stream(command: list[str], env: dict[str, str], log: Path, mark: str,
           timeout: float = 3600) -> tuple[list[float], float, int]:
    """Run ``command``; the times its round lines (those with ``mark``) reached us, its end, its exit code."""
    marks: list[float] = []
    with open(log, "w") as out:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=log.parent)
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        for line in proc.stdout:
            out.write(line)
            if mark in line:
                marks.append(time.monotonic())
            if time.monotonic() > deadline:
                proc.kill()
                break
        code = proc.wait()
    return marks, time.monotonic(), code


def _metrics_rounds(run_dir: Path) -> list[float]:
    with open(run_dir / "metrics.csv") as handle:
        return [float(row["round_seconds"]) for row in csv.DictReader(handle)]


def _measured(name: str, work: Path, command: list[str], env: dict[str, str], rounds: int, *,
              from_metrics: Path | None, memory: bool) -> dict:
    """One run: its rounds, wall time and (``memory``) summed PSS. Sampling every process's PSS costs CPU
    (the kernel walks their page tables): the timed workloads (a) and (b) run without it."""
    marker = uuid.uuid4().hex
    sampler = PssSampler(marker)
    if memory:
        sampler.start()
    started = time.monotonic()
    try:
        marks, end, code = stream(command, {**env, MARKER: marker}, work / f"{name}.log",
                                  TASK_ROUND_MARK if from_metrics is not None else APP_ROUND_MARK)
    finally:
        if memory:
            sampler.stop()
        stop_marked(marker)
    if code != 0:
        raise RuntimeError(f"{name} failed (exit {code}); see {work / (name + '.log')}")
    if from_metrics is not None:
        seconds = _metrics_rounds(from_metrics)
        window = (marks[0] - seconds[0], marks[-1]) if marks else (None, None)
    else:  # the app's [ROUND k/R] lines: a round lasts until the next one's line (the last, until the run's end)
        points = marks[:rounds] + [end]
        seconds = [b - a for a, b in zip(points, points[1:])]
        window = (marks[0], end) if marks else (None, None)
    if len(seconds) != rounds:
        raise RuntimeError(f"{name}: {len(seconds)} rounds measured, expected {rounds}; see {work / (name + '.log')}")
    peak, rest = sampler.peak_and_rest(*window) if memory else (float("nan"), float("nan"))
    return {"rounds": seconds, "median": median(seconds[1:] or seconds), "wall": end - started, "peak_pss_mib": peak,
            "rest_pss_mib": rest}


def ray_digits(work: Path, clients: int, sampled: int, rounds: int, num_cpus: int, *, memory: bool = False) -> dict:
    name = f"ray-digits-{clients}-cpus{num_cpus}-{uuid.uuid4().hex[:6]}"
    run_dir = work / name
    run_dir.mkdir(parents=True)
    write_app(run_dir / "app",
              RunSettings(num_rounds=rounds, min_clients=clients, sampled=sampled, run_dir=str(run_dir)))
    env = local_simulation_env(run_dir / "flwr-home")
    federation = f"num-supernodes={clients} client-resources-num-cpus={num_cpus} client-resources-num-gpus=0.0"
    return _measured(name, work, [str(BIN / "flwr"), "run", str(run_dir / "app"), "local", "--federation-config",
                                  federation, "--stream"], env, rounds, from_metrics=run_dir, memory=memory)


def ray_app(work: Path, nodes: int, rounds: int, num_cpus: int) -> dict:
    name = f"ray-quickstart-cpus{num_cpus}-{uuid.uuid4().hex[:6]}"
    env = local_simulation_env(work / f"{name}-home")
    federation = f"num-supernodes={nodes} client-resources-num-cpus={num_cpus} client-resources-num-gpus=0.0"
    return _measured(name, work, [str(BIN / "flwr"), "run", str(APP), "local", "--federation-config", federation,
                                  "--stream", "--run-config", f"num-server-rounds={rounds}"],
                     env, rounds, from_metrics=None, memory=False)


def fedgpu_digits(work: Path, clients: int, sampled: int, rounds: int, *extra: str, memory: bool = False) -> dict:
    name = f"fedgpu-digits-{clients}{'-sim' if '--simulation' in extra else ''}-{uuid.uuid4().hex[:6]}"
    run_dir = work / name
    command = [str(ROOT / "run.sh"), str(clients), str(clients), str(sampled), str(rounds), "--run-dir", str(run_dir),
               *extra]
    return _measured(name, work, command, {**os.environ, **QUIET}, rounds, from_metrics=run_dir, memory=memory)


def fedgpu_app(work: Path, nodes: int, rounds: int, *extra: str) -> dict:
    name = f"fedgpu-quickstart{'-sim' if '--simulation' in extra else ''}-{uuid.uuid4().hex[:6]}"
    command = [str(BIN / "fedgpu"), "run", str(APP), "--nodes", str(nodes),
               "--run-config", f"num-server-rounds={rounds}", "--run-dir", str(work / name), *extra]
    return _measured(name, work, command, {**os.environ, **QUIET}, rounds, from_metrics=None, memory=False)


LOAD_DATA_PROBE = """
import gc, json, os, resource, sys, time
sys.path.insert(0, sys.argv[1])
nodes, children = int(sys.argv[2]), int(sys.argv[3])
import pytorchexample.client_app  # what fedgpu's zygote imports for this app
from pytorchexample.task import load_data
gc.collect(); gc.freeze()
firsts = []
for i in range(children):  # each a child forked from that warm process, as a message's child is
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        start = time.process_time(); load_data(i % nodes, nodes, 32)
        os.write(write, str(time.process_time() - start).encode()); os._exit(0)
    os.close(write); os.waitpid(pid, 0); firsts.append(float(os.read(read, 64)))
load_data(0, nodes, 32)  # built here, once
again = time.process_time(); load_data(1, nodes, 32); load_data(2, nodes, 32); again = time.process_time() - again
print(json.dumps([firsts, again / 2]))
"""


def app_data_load_cpu_seconds(nodes: int, children: int = 9) -> tuple[float, float]:
    """quickstart-pytorch's ``load_data``, in CPU seconds: its first call in a child forked from a process that
    imported the ClientApp module (what every message's child pays: the app builds its dataset once per process),
    median of ``children``; and a later call in one process (what a long-lived Ray actor pays)."""
    done = subprocess.run([sys.executable, "-c", LOAD_DATA_PROBE, str(APP), str(nodes), str(children)],
                          capture_output=True, text=True, check=True,
                          env={**os.environ, **QUIET, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"})
    firsts, again = json.loads(done.stdout.strip().splitlines()[-1])
    return median(firsts), again


def combined(runs: list[dict]) -> dict:
    """Several runs of one setup as one: every round kept, the median over rounds 2+ of all of them."""
    later = [seconds for run in runs for seconds in (run["rounds"][1:] or run["rounds"])]
    return {"rounds": [s for run in runs for s in run["rounds"]], "median": median(later),
            "wall": median(run["wall"] for run in runs), "peak_pss_mib": max(run["peak_pss_mib"] for run in runs),
            "rest_pss_mib": min(run["rest_pss_mib"] for run in runs), "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-deployment", action="store_true",
                        help="leave out fedgpu's deployment mode in (a) and (b)")
    parser.add_argument("--only", choices=("a", "b", "c"), action="append", help="run only these parts")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each setup in (a) and (b), interleaved")
    parser.add_argument("--keep", action="store_true", help="keep the run directories")
    args = parser.parse_args()
    try:
        import ray  # noqa: F401
    except ImportError:
        raise SystemExit("sim_rounds: the Simulation Engine needs flwr[simulation]: "
                         ".venv/bin/pip install -e '.[bench]'") from None
    parts = args.only or ["a", "b", "c"]
    cores = len(os.sched_getaffinity(0))
    ours = f"fedgpu --simulation --workers {cores}"
    workers = ["--simulation", "--workers", str(cores)]  # as many as Ray's actors at one CPU each
    work = Path(tempfile.mkdtemp(prefix="fedgpu-bench-sim-"))
    results: dict[str, dict[str, dict]] = {}
    body, lines = "", []
    headers = ["runtime", "round seconds (each run)", "median round s (2+)", "wall s", "peak PSS MiB",
               "at-rest PSS MiB"]

    def rows(part: dict[str, dict]) -> list[list]:
        def seconds(r: dict) -> str:
            return " / ".join(" ".join(f"{s:.2f}" for s in run["rounds"]) for run in r.get("runs", [r]))

        def mib(value: float) -> Any:
            return "not sampled" if value != value else value  # NaN: a timed run, no PSS sampling

        return [[name, seconds(r), r["median"], r["wall"], mib(r["peak_pss_mib"]), mib(r["rest_pss_mib"])]
                for name, r in part.items()]

    def interleaved(setups: dict[str, Any]) -> dict[str, dict]:
        runs: dict[str, list[dict]] = {name: [] for name in setups}
        for repeat in range(args.repeats):
            for name, run in setups.items():
                if repeat == 0 or "deployment" not in name:  # deployment mode is slow: once
                    runs[name].append(run())
        return {name: combined(found) for name, found in runs.items()}

    if "a" in parts:
        setups = {
            "Simulation Engine, num-cpus=1 (best here)": lambda: ray_digits(work, 10, 5, 5, 1),
            "Simulation Engine, num-cpus=2 (Flower's default)": lambda: ray_digits(work, 10, 5, 5, 2),
            ours: lambda: fedgpu_digits(work, 10, 5, 5, *workers),
        }
        if not args.skip_deployment:
            setups["fedgpu deployment (SuperLink, 10 nodes)"] = lambda: fedgpu_digits(work, 10, 5, 5)
        part = results["digits"] = interleaved(setups)
        body += "### (a) digits, 10 clients, 5 sampled, 5 rounds\n\n" + table(headers, rows(part)) + "\n\n"
    if "b" in parts:
        setups = {
            "Simulation Engine, num-cpus=1 (best here)": lambda: ray_app(work, 4, 4, 1),
            "Simulation Engine, num-cpus=2 (Flower's default)": lambda: ray_app(work, 4, 4, 2),
            ours: lambda: fedgpu_app(work, 4, 4, *workers),
        }
        if not args.skip_deployment:
            setups["fedgpu deployment (SuperLink, 4 nodes)"] = lambda: fedgpu_app(work, 4, 4)
        part = results["quickstart-pytorch"] = interleaved(setups)
        first, again = app_data_load_cpu_seconds(4)
        # Every round sends 4 train and 2 evaluate messages (fraction-evaluate 0.5); each message's child builds the
        # dataset afresh. The CPU that alone needs, against all the CPU the host has during Ray's median round, is
        # the least R any runtime that gives every message a fresh process can reach on this app.
        messages, ray_round = 6, part["Simulation Engine, num-cpus=1 (best here)"]["median"]
        bound = messages * first / (ray_round * cores)
        results["quickstart-pytorch load_data"] = {"first_call_cpu_seconds": first, "later_call_cpu_seconds": again,
                                                   "messages_per_round": messages, "cores": cores,
                                                   "least_ratio_with_a_fresh_process_per_message": bound}
        body += ("### (b) Flower's quickstart-pytorch, 4 nodes, 4 rounds\n\n" + table(headers, rows(part)) +
                 f"\n\nThe app builds its dataset on the first `load_data` call of a process and keeps it in a module "
                 f"global: {first:.2f} CPU s on a first call in a child forked from a process that imported the "
                 f"ClientApp module (median of 9 children), {again:.3f} CPU s on a later one. A Ray actor pays it once "
                 f"per actor; fedgpu pays it in every message's child, {messages} messages a round here: "
                 f"{messages * first:.2f} CPU s a round for the data alone, against {ray_round * cores:.2f} CPU s that "
                 f"{cores} cores give in Ray's median round. No runtime that runs every message in a fresh process "
                 f"can go below {bound:.2f}x on this app, unchanged.\n\n")
        lines.append("quickstart-pytorch: least ratio for a fresh process per message (dataset built in each) = "
                     f"{bound:.2f}x")
    if "c" in parts:
        part = results["1000 clients"] = {}
        part["Simulation Engine (Ray), num-cpus=1"] = ray_digits(work, 1000, 10, 3, 1, memory=True)
        part[ours] = fedgpu_digits(work, 1000, 10, 3, *workers, memory=True)
        ray_side, fedgpu_side = part.values()
        body += ("### (c) digits, 1000 clients, 10 sampled, 3 rounds\n\n" + table(headers, rows(part)) +
                 f"\n\nfedgpu --simulation's wall time is {fedgpu_side['wall'] / ray_side['wall']:.2f}x plain Ray's; "
                 f"its median round {fedgpu_side['median'] / ray_side['median']:.2f}x. PSS: every process of the run, "
                 "summed, sampled every 0.25 s from round 1 to the end (at rest: the lowest sample).\n\n")
        lines.append("1000 clients: fedgpu --simulation / plain Ray wall time = "
                     f"{fedgpu_side['wall'] / ray_side['wall']:.2f}x")
    # The last lines: one per workload, the ratio the goal is set on (R <= 1.0).
    for workload in ("digits", "quickstart-pytorch"):
        if workload in results:
            part = results[workload]
            best = part["Simulation Engine, num-cpus=1 (best here)"]["median"]
            lines.append(f"{workload}: fedgpu --simulation / Simulation Engine median round = "
                         f"{part[ours]['median'] / best:.2f}x")
    body += "\n".join(lines)
    report("sim_rounds", "Simulation mode against the Simulation Engine (Ray) and deployment mode", body, results)
    print("\n".join(lines))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
