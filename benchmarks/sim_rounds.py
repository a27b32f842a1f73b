"""Simulation mode against Flower's Simulation Engine (Ray) and fedgpu's deployment mode, side by side in one run.

  (a) digits, 10 clients, 5 sampled, 5 rounds (fedgpu's own ServerApp and ClientApp in all):
      the Simulation Engine at its best here (client-resources num-cpus=1: one actor per core),
      the Simulation Engine as Flower ships it (num-cpus=2: one actor on 2 cores),
      ``fedgpu run --simulation`` (``--workers`` = the best actor count), and fedgpu's deployment mode;
  (b) Flower's quickstart-pytorch (examples/, offline data stand-in), 4 nodes, 4 rounds: the same four;
  (c) digits, 1000 clients, 10 sampled, 3 rounds: plain Ray (at its best) against ``fedgpu --simulation``:
      wall time, median round, peak and at-rest summed PSS of every process of the run.

Round seconds: (a) and (c) from each run's metrics.csv (the same ServerApp writes it); (b) from the time
each ``[ROUND k/R]`` line of the app's own log reached us. Medians over rounds 2 and later (round 1 also
waits for start-up). PSS: every process carrying the run's marker, sampled every 0.25 s from round 1's
start to the last round's end; "at rest" is the lowest such sample (no message in flight).

    .venv/bin/python benchmarks/sim_rounds.py [--skip-deployment] [--keep]
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from common import median, report, table  # noqa: E402

from fedgpu.flower.node import free_port  # noqa: E402
from fedgpu.flower.server import write_app  # noqa: E402
from fedgpu.flower.settings import RunSettings  # noqa: E402
from fedgpu.isolation.procs import stop_tree  # noqa: E402
from fedgpu.monitor.host import pss_bytes  # noqa: E402

APP = ROOT / "examples" / "quickstart-pytorch"
BIN = Path(sys.executable).parent
MARKER = "FEDGPU_BENCH_MARKER"
QUIET = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_USAGE_STATS_ENABLED": "0",
         "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
ROUND_MARKS = ("[ROUND ", "[fedgpu] round ")  # a round's line: the app's own (quickstart), or fedgpu's ServerApp's
MIB = 2**20


def marked(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if f"{MARKER}={marker}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


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


def stream(command: list[str], env: dict[str, str], log: Path, timeout: float = 3600) -> tuple[list[float], float, int]:
    """Run ``command``; the times its round lines reached us, its end, its exit code."""
    marks: list[float] = []
    with open(log, "w") as out:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=log.parent)
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        for line in proc.stdout:
            out.write(line)
            if any(mark in line for mark in ROUND_MARKS):
                marks.append(time.monotonic())
            if time.monotonic() > deadline:
                proc.kill()
                break
        code = proc.wait()
    return marks, time.monotonic(), code


def _cleanup(marker: str) -> None:
    for pid in marked(marker):
        stop_tree(pid, 5.0)


def _metrics_rounds(run_dir: Path) -> list[float]:
    with open(run_dir / "metrics.csv") as handle:
        return [float(row["round_seconds"]) for row in csv.DictReader(handle)]


def _measured(name: str, work: Path, command: list[str], env: dict[str, str], rounds: int, *,
              from_metrics: Path | None) -> dict:
    marker = uuid.uuid4().hex
    sampler = PssSampler(marker)
    sampler.start()
    started = time.monotonic()
    try:
        marks, end, code = stream(command, {**env, MARKER: marker}, work / f"{name}.log")
    finally:
        sampler.stop()
        _cleanup(marker)
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
    peak, rest = sampler.peak_and_rest(*window)
    return {"rounds": seconds, "median": median(seconds[1:] or seconds), "wall": end - started, "peak_pss_mib": peak,
            "rest_pss_mib": rest}


def _local_home(directory: Path) -> dict[str, str]:
    """A FLWR_HOME whose default connection is the local Simulation Engine (``flwr run APP local``)."""
    directory.mkdir(parents=True)
    (directory / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n')
    env = {**os.environ, **QUIET, "FLWR_HOME": str(directory), "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("FEDGPU_ZYGOTE", None)
    return env


def ray_digits(work: Path, clients: int, sampled: int, rounds: int, num_cpus: int) -> dict:
    name = f"ray-digits-{clients}-cpus{num_cpus}"
    run_dir = work / name
    run_dir.mkdir(parents=True)
    write_app(run_dir / "app", RunSettings(num_rounds=rounds, min_clients=clients, sampled=sampled, run_dir=str(run_dir)))
    env = _local_home(run_dir / "flwr-home")
    federation = f"num-supernodes={clients} client-resources-num-cpus={num_cpus} client-resources-num-gpus=0.0"
    return _measured(name, work, [str(BIN / "flwr"), "run", str(run_dir / "app"), "local", "--federation-config",
                                  federation, "--stream"], env, rounds, from_metrics=run_dir)


def ray_app(work: Path, nodes: int, rounds: int, num_cpus: int) -> dict:
    name = f"ray-quickstart-cpus{num_cpus}"
    env = _local_home(work / f"{name}-home")
    federation = f"num-supernodes={nodes} client-resources-num-cpus={num_cpus} client-resources-num-gpus=0.0"
    return _measured(name, work, [str(BIN / "flwr"), "run", str(APP), "local", "--federation-config", federation,
                                  "--stream", "--run-config", f"num-server-rounds={rounds}"], env, rounds, from_metrics=None)


def fedgpu_digits(work: Path, clients: int, sampled: int, rounds: int, *extra: str) -> dict:
    name = f"fedgpu-digits-{clients}{'-sim' if '--simulation' in extra else ''}"
    run_dir = work / name
    command = [str(ROOT / "run.sh"), str(clients), str(clients), str(sampled), str(rounds), "--run-dir", str(run_dir), *extra]
    return _measured(name, work, command, {**os.environ, **QUIET}, rounds, from_metrics=run_dir)


def fedgpu_app(work: Path, nodes: int, rounds: int, *extra: str) -> dict:
    name = f"fedgpu-quickstart{'-sim' if '--simulation' in extra else ''}"
    command = [str(BIN / "fedgpu"), "run", str(APP), "--nodes", str(nodes), "--run-config", f"num-server-rounds={rounds}",
               "--run-dir", str(work / name), *extra]
    return _measured(name, work, command, {**os.environ, **QUIET}, rounds, from_metrics=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-deployment", action="store_true", help="leave out fedgpu's deployment mode in (a) and (b)")
    parser.add_argument("--only", choices=("a", "b", "c"), action="append", help="run only these parts")
    parser.add_argument("--keep", action="store_true", help="keep the run directories")
    args = parser.parse_args()
    try:
        import ray  # noqa: F401
    except ImportError:
        raise SystemExit("sim_rounds: the Simulation Engine needs flwr[simulation]: .venv/bin/pip install -e '.[bench]'")
    parts = args.only or ["a", "b", "c"]
    cores = len(os.sched_getaffinity(0))
    workers = ["--simulation", "--workers", str(cores)]  # as many as Ray's actors at one CPU each
    work = Path(tempfile.mkdtemp(prefix="fedgpu-bench-sim-"))
    results: dict[str, dict[str, dict]] = {}
    body, lines = "", []
    headers = ["runtime", "round seconds", "median round s (2+)", "wall s", "peak PSS MiB", "at-rest PSS MiB"]

    def rows(part: dict[str, dict]) -> list[list]:
        return [[name, " ".join(f"{s:.2f}" for s in r["rounds"]), r["median"], r["wall"], r["peak_pss_mib"],
                 r["rest_pss_mib"]] for name, r in part.items()]

    if "a" in parts:
        part = results["digits"] = {}
        part["Simulation Engine, num-cpus=1 (best here)"] = ray_digits(work, 10, 5, 5, 1)
        part["Simulation Engine, num-cpus=2 (Flower's default)"] = ray_digits(work, 10, 5, 5, 2)
        part[f"fedgpu --simulation --workers {cores}"] = fedgpu_digits(work, 10, 5, 5, *workers)
        if not args.skip_deployment:
            part["fedgpu deployment (SuperLink, 10 nodes)"] = fedgpu_digits(work, 10, 5, 5)
        body += "### (a) digits, 10 clients, 5 sampled, 5 rounds\n\n" + table(headers, rows(part)) + "\n\n"
    if "b" in parts:
        part = results["quickstart-pytorch"] = {}
        part["Simulation Engine, num-cpus=1 (best here)"] = ray_app(work, 4, 4, 1)
        part["Simulation Engine, num-cpus=2 (Flower's default)"] = ray_app(work, 4, 4, 2)
        part[f"fedgpu --simulation --workers {cores}"] = fedgpu_app(work, 4, 4, *workers)
        if not args.skip_deployment:
            part["fedgpu deployment (SuperLink, 4 nodes)"] = fedgpu_app(work, 4, 4)
        body += "### (b) Flower's quickstart-pytorch, 4 nodes, 4 rounds\n\n" + table(headers, rows(part)) + "\n\n"
    if "c" in parts:
        part = results["1000 clients"] = {}
        part["Simulation Engine (Ray), num-cpus=1"] = ray_digits(work, 1000, 10, 3, 1)
        part[f"fedgpu --simulation --workers {cores}"] = fedgpu_digits(work, 1000, 10, 3, *workers)
        ray_side, ours = part.values()
        body += ("### (c) digits, 1000 clients, 10 sampled, 3 rounds\n\n" + table(headers, rows(part)) +
                 f"\n\nfedgpu --simulation's wall time is {ours['wall'] / ray_side['wall']:.2f}x plain Ray's; its median "
                 f"round {ours['median'] / ray_side['median']:.2f}x.\n\n")
    for workload in ("digits", "quickstart-pytorch"):
        if workload in results:
            part = results[workload]
            best = part["Simulation Engine, num-cpus=1 (best here)"]["median"]
            ours = part[f"fedgpu --simulation --workers {cores}"]["median"]
            lines.append(f"{workload}: fedgpu --simulation / Simulation Engine median round = {ours / best:.2f}x")
    body += "\n".join(lines)
    report("sim_rounds", "Simulation mode against the Simulation Engine (Ray) and deployment mode", body, results)
    print("\n".join(lines))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
