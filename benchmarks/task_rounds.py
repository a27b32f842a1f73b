"""Seconds per round of each task, through ./run.sh on this machine (--mp, zygote).

Without network the Hub datasets and weights cannot be fetched, so each task
runs on small local files of its dataset's schema (tests/workload_data.py:
random pixels, made-up reviews) and, for vit-flowers, random weights, which
cost the same to compute as the real ones. What a round costs therefore comes
from the model and the per-client data size given here, not from the
dataset's full size: the table says how many examples each client trains on.

    .venv/bin/python benchmarks/task_rounds.py [--clients 4 --sampled 2 --rounds 3] [--tasks digits,cifar10,...]
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT / "tests")]
import workload_data  # noqa: E402
from common import median, report, table  # noqa: E402

# task -> (options for ./run.sh given the data directory, training examples per client, what travels)
TASKS = {
    "digits": (lambda d: [], "1437 / C", "all 8 arrays of the CNN (28 k numbers)"),
    "cifar10": (lambda d: ["--data-files", str(workload_data.cifar10(d / "cifar10", train=64 * 4, test=256))],
                "256 / C", "all 10 arrays of the quickstart CNN (62 k numbers)"),
    "vit-flowers": (lambda d: ["--data-files", str(workload_data.flowers(d / "flowers", train=20 * 32, test=64)),
                               "--task-option", "weights=none"],
                    "32 (640 / 20 partitions)", "the head only: 2 arrays (78 k numbers), not the 86 M backbone"),
    "text-imdb": (lambda d: ["--data-files", str(workload_data.imdb(d / "imdb", train=400, test=100)),
                             "--task-option", f"model={workload_data.tiny_bert(d / 'bert')}"],
                  "400 / C", "all of the (here: smaller) BERT"),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--sampled", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tasks", default=",".join(TASKS))
    args = parser.parse_args()
    rows, raw = [], {}
    with tempfile.TemporaryDirectory(prefix="fedgpu-task-rounds-") as scratch:
        base = Path(scratch)
        env_cache = {"HF_DATASETS_CACHE": str(base / "hf-cache")}
        for task in args.tasks.split(","):
            options, per_client, travels = TASKS[task]
            run_dir = base / f"run-{task}"
            command = [str(ROOT / "run.sh"), str(args.clients), str(args.clients), str(args.sampled), str(args.rounds),
                       "--task", task, "--local-epochs", "1", "--run-dir", str(run_dir), *options(base)]
            done = subprocess.run(command, capture_output=True, text=True,
                                  env={**__import__("os").environ, **env_cache})
            if done.returncode != 0:
                sys.exit(f"{task}: run.sh exited {done.returncode}\n{done.stderr[-3000:]}")
            with open(run_dir / "metrics.csv") as handle:
                seconds = [float(row["round_seconds"]) for row in csv.DictReader(handle)]
            raw[task] = {"round_seconds": seconds, "command": command}
            # Round 1 also waits for every node to connect: the steady state is rounds 2 and later.
            rows.append([task, per_client, travels, median(seconds[1:] or seconds), seconds[0]])
    body = table(["task", "examples per client", "what travels", "s per round (median, rounds 2+)", "round 1 s"], rows)
    body += (f"\n\n{args.clients} client nodes, {args.sampled} sampled per round, {args.rounds} rounds, 1 local epoch, "
             "CPU, one torch thread per child; local files of each dataset's schema (see the script's docstring).")
    report("task_rounds", "Seconds per round of each task", body, raw)


if __name__ == "__main__":
    main()
