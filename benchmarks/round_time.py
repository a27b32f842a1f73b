"""Round wall time: fedgpu (--mp, zygote) against Flower's Simulation Engine, same app and work.

Both run the very same Flower app: fedgpu's ServerApp (exact sampling, central
evaluation each round) and ClientApp on the digits task, with the same clients,
sampled clients, rounds, epochs and learning rate.
  * fedgpu: ``launchers/federation.sh C C K R`` (a SuperLink, C client nodes,
    one shared zygote; each message in a forked child);
  * simulation: ``flwr run APP local`` with ``num-supernodes=C`` on the Ray
    backend (needs ``flwr[simulation]``: ``pip install -e .[bench]``), one CPU
    per virtual client, so as many actors as cores train in parallel.
  * fedgpu at Flower's pace: the same with ``FEDGPU_NODE_PACE=flower``, the
    SuperNode's 3 s idle pulls and 0.5 s reply turns as Flower ships them (the "before").
Round times come from each run's own metrics.csv (written by the same ServerApp).
``--task cifar10`` runs the quickstart CNN on CIFAR-10-shaped local files
(tests/workload_data.py; no network here), ``--train-examples`` of them.

    .venv/bin/python benchmarks/round_time.py [--clients 10 --sampled 5 --rounds 3] [--task cifar10]
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
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT / "tests")]
from fedgpu.flower.settings import RunSettings  # noqa: E402
from fedgpu.flower.superlink import write_app  # noqa: E402
from fedgpu.isolation.procs import stop_tree  # noqa: E402
from fedgpu.net import free_port  # noqa: E402

from common import median, report, table  # noqa: E402

BIN = Path(sys.executable).parent
QUIET = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_USAGE_STATS_ENABLED": "0",
         "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def read_rounds(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def run_fedgpu(run_dir: Path, clients: int, sampled: int, rounds: int, task: list[str], pace: str = "") -> float:
    started = time.perf_counter()
    done = subprocess.run(
        [str(ROOT / "launchers" / "federation.sh"), str(clients), str(clients), str(sampled), str(rounds),
         "--run-dir", str(run_dir), *task],
        env={**os.environ, **QUIET, **({"FEDGPU_NODE_PACE": pace} if pace else {})}, capture_output=True, text=True,
        timeout=3600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"fedgpu run failed ({done.returncode}): {done.stderr[-2000:]}")
    return time.perf_counter() - started


def _simulation_superlinks(home: Path) -> list[int]:
    """The detached `flower-superlink --simulation` that `flwr run ... local` leaves behind."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if f"FLWR_HOME={home}".encode() in environ and b"flower-superlink" in cmdline:
                found.append(int(entry.name))
    return found


def round_breakdown(run_dir: Path) -> list[list]:
    """Where a fedgpu round's time goes, from its events (medians over rounds; per message where per message)."""
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines() if line.strip()]
    spans: dict[str, list[float]] = {}

    def add(name: str, seconds: float) -> None:
        spans.setdefault(name, []).append(seconds)

    rounds = sorted({e["round"] for e in events if e["event"] == "round-start"})
    for r in rounds:
        mine = [e for e in events if e.get("round") == r]
        start = next(e["t"] for e in mine if e["event"] == "round-start")
        end = next((e["t"] for e in mine if e["event"] == "round-end"), None)
        kids = {(e["event"], e["pid"]): e["t"] for e in mine if e.get("role") == "client-child"}
        pids = {pid for _, pid in kids}
        replies = {e["client"]: e["t"] for e in mine if e["event"] == "message-end"}
        ends = {e["pid"]: e for e in mine if e["event"] == "child-end" and e.get("role") == "client-child"}
        for pid in pids:
            if ("child-start", pid) in kids and ("child-end", pid) in kids:
                add("send + node pickup (round start -> child started)", kids[("child-start", pid)] - start)
                add("child: start, work, weights back (per message)",
                    kids[("child-end", pid)] - kids[("child-start", pid)])
                client = ends[pid].get("client")
                if client in replies:
                    add("reply stored at the node (child end -> message-end)",
                        replies[client] - kids[("child-end", pid)])
        evaluation = [e for e in mine if e.get("role") == "server-child" and e.get("message") == "server-evaluate"]
        if replies and evaluation:
            add("last reply -> evaluation starts (push, ServerApp pull, aggregation)",
                min(e["t"] for e in evaluation if e["event"] == "child-start") - max(replies.values()))
            add("server evaluation in a child", max(e["t"] for e in evaluation) - min(e["t"] for e in evaluation))
        if end is not None:
            add("whole round", end - start)
    return [[name, median(values)] for name, values in spans.items()]


def run_simulation(run_dir: Path, clients: int, sampled: int, rounds: int, task: list[str]) -> float:
    try:
        import ray  # noqa: F401
    except ImportError:
        raise SystemExit("round_time: the Simulation Engine needs flwr[simulation]: "
                         ".venv/bin/pip install -e '.[bench]'") from None
    run_dir.mkdir(parents=True)
    home = run_dir / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n')
    named = dict(zip(task[::2], task[1::2]))
    settings = RunSettings(num_rounds=rounds, min_clients=clients, sampled=sampled, run_dir=str(run_dir),
                           task=named.get("--task", "digits"), data_files=named.get("--data-files", ""))
    write_app(run_dir / "app", settings)
    env = {**os.environ, **QUIET, "FLWR_HOME": str(home), "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    federation = f"num-supernodes={clients} client-resources-num-cpus=1 client-resources-num-gpus=0.0"
    started = time.perf_counter()
    try:
        with open(run_dir / "simulation.log", "w") as log:
            subprocess.run([str(BIN / "flwr"), "run", str(run_dir / "app"), "local", "--federation-config", federation,
                            "--stream"],
                           env=env, stdout=log, stderr=subprocess.STDOUT, timeout=3600, check=False)
        elapsed = time.perf_counter() - started
    finally:
        for pid in _simulation_superlinks(home):
            stop_tree(pid, 10.0)
    rows = read_rounds(run_dir) if (run_dir / "metrics.csv").exists() else []
    if len(rows) != rounds:
        raise RuntimeError(f"simulation did not complete {rounds} rounds; see {run_dir / 'simulation.log'}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--sampled", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--task", default="digits", choices=("digits", "cifar10"))
    parser.add_argument("--train-examples", type=int, default=2560,
                        help="cifar10: local examples in all (split over clients)")
    parser.add_argument("--keep", action="store_true", help="keep the run directories")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedgpu-bench-rounds-"))
    task = []
    if args.task == "cifar10":
        import workload_data

        task = ["--task", "cifar10", "--data-files",
                str(workload_data.cifar10(work / "cifar10", train=args.train_examples, test=500))]
    walls = {
        "fedgpu --mp (zygote)": run_fedgpu(work / "fedgpu", args.clients, args.sampled, args.rounds, task),
        "Flower Simulation Engine (Ray)": run_simulation(
            work / "simulation", args.clients, args.sampled, args.rounds, task),
        "fedgpu at Flower's pace (before)": run_fedgpu(
            work / "flower-pace", args.clients, args.sampled, args.rounds, task, "flower"),
    }
    rows, raw, medians = [], {}, {}
    for (name, wall), directory in zip(walls.items(), ("fedgpu", "simulation", "flower-pace")):
        metrics = read_rounds(work / directory)
        seconds = [float(r["round_seconds"]) for r in metrics]
        medians[name] = median(seconds)
        raw[name] = {"wall_seconds": wall, "rounds": metrics}
        rows.append([name, *seconds, median(seconds), wall, float(metrics[-1]["server_accuracy"])])
    names = list(walls)
    ratio = medians[names[0]] / medians[names[1]]
    before = medians[names[2]] / medians[names[1]]
    body = table(["runtime", *[f"round {r + 1} s" for r in range(args.rounds)], "median round s", "wall s (all)",
                  "final accuracy"], rows)
    body += (
        f"\n\n{args.clients} clients, {args.sampled} sampled per round, {args.rounds} rounds of {args.task}"
        f"{' (local stand-in data, ' + str(args.train_examples) + ' training examples in all)' if task else ''}, "
        f"the same fedgpu ServerApp and ClientApp in all. **fedgpu's median round takes {ratio:.2f}x the Simulation "
        f"Engine's; at Flower's pace (before) {before:.2f}x.** Wall time includes start-up (SuperLink, nodes, zygote; "
        "Ray) and the initial evaluation."
    )
    body += "\n\nWhere a fedgpu round goes (medians; from the run's events.jsonl):\n\n" + table(
        ["span", "seconds"], round_breakdown(work / "fedgpu"))
    report("round_time" + ("" if args.task == "digits" else f"_{args.task}"),
           "Round wall time: fedgpu against Flower's Simulation Engine", body, raw)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
