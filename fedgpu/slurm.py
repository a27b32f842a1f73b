"""A fedgpu federation laid out over a Slurm allocation: which command runs where.

``python -m fedgpu.slurm`` reads the allocation from the SLURM_* variables and prints
one ``srun`` command per line: the server on the allocation's first node, then
one per node that starts that node's zygote and its share of the client nodes
(``launchers/slurm/node.sh``). ``launchers/slurm/run-job.sh`` runs them. Client
nodes are dealt to nodes in turn, so every node (the server's too) gets
``clients / nodes`` of them; on a node, children are placed on the GPUs Slurm
gave it (``CUDA_VISIBLE_DEVICES``) by free memory, through that node's ledger.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path


class NotInAllocation(ValueError):
    """No Slurm allocation in the environment, or one we cannot read."""


def expand_hostlist(text: str) -> list[str]:
    """Slurm's compressed host list: ``gpu[01-03,07],cpu1`` -> gpu01 gpu02 gpu03 gpu07 cpu1."""
    hosts: list[str] = []
    for match in re.finditer(r"([^,\[]+)(?:\[([^\]]*)\])?([^,\[]*)", text):
        prefix, ranges, suffix = match.groups()
        if not prefix and not ranges:
            continue
        if ranges is None:
            hosts.append(prefix + suffix)
            continue
        for part in ranges.split(","):
            low, _, high = part.partition("-")
            if not low.isdigit() or (high and not high.isdigit()):
                raise NotInAllocation(f"cannot read the host list {text!r}")
            for number in range(int(low), int(high or low) + 1):
                hosts.append(f"{prefix}{number:0{len(low)}d}{suffix}")
    if not hosts:
        raise NotInAllocation(f"cannot read the host list {text!r}")
    return hosts


@dataclass(frozen=True)
class Allocation:
    job_id: str
    hosts: list[str]
    gpus_per_node: int  # 0: none requested

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Allocation:
        env = dict(os.environ if env is None else env)
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not env.get("SLURM_JOB_ID") or not nodelist:
            raise NotInAllocation("not inside a Slurm allocation (no SLURM_JOB_ID / SLURM_JOB_NODELIST): submit with sbatch")
        gpus = env.get("SLURM_GPUS_ON_NODE") or env.get("SLURM_GPUS_PER_NODE") or "0"
        count = re.search(r"(\d+)\s*$", gpus)  # "4", or "a100:4"
        return cls(env["SLURM_JOB_ID"], expand_hostlist(nodelist), int(count.group(1)) if count else 0)


@dataclass(frozen=True)
class JobSettings:
    clients: int
    min_clients: int
    sampled: int
    rounds: int
    run_dir: str
    port: int = 9092
    task: str = "digits"
    mp: bool = True
    tls: bool = False
    server_args: tuple[str, ...] = ()  # passed through to `fedgpu server`
    client_args: tuple[str, ...] = ()  # passed through to every `fedgpu client`


def deal_clients(clients: int, hosts: list[str]) -> dict[str, list[int]]:
    """Client i goes to host i mod len(hosts)."""
    dealt: dict[str, list[int]] = {host: [] for host in hosts}
    for client in range(clients):
        dealt[hosts[client % len(hosts)]].append(client)
    return dealt


def srun(host: str, gpus: int, *command: str) -> list[str]:
    # --overlap: the steps on a node share its CPUs and GPUs (the server's evaluation and that
    # node's children); --kill-on-bad-exit: a failed step ends the job.
    resources = [f"--gpus-per-node={gpus}"] if gpus else []
    return ["srun", "--nodes=1", "--ntasks=1", f"--nodelist={host}", *resources, "--overlap", "--kill-on-bad-exit=1", *command]


def plan(allocation: Allocation, job: JobSettings, root: str) -> list[list[str]]:
    """The job's commands: the server's step first, then one step per node that has clients."""
    if job.clients < 1 or not 1 <= job.min_clients <= job.clients or not 1 <= job.sampled <= job.clients:
        raise ValueError("need 1 <= min <= clients and 1 <= sampled <= clients")
    run_dir = str(Path(job.run_dir).absolute())
    server_host = allocation.hosts[0]
    certs = f"{run_dir}/certs"
    server = [f"{root}/.venv/bin/fedgpu", "server", "--host", "0.0.0.0", "--port", str(job.port),
              "--rounds", str(job.rounds), "--min-clients", str(job.min_clients), "--sampled", str(job.sampled),
              "--task", job.task, "--run-dir", run_dir, *job.server_args]
    if job.tls:
        server += ["--ssl-ca-certfile", f"{certs}/ca.crt", "--ssl-certfile", f"{certs}/server.pem",
                   "--ssl-keyfile", f"{certs}/server.key", "--auth-public-keys", f"{certs}/nodes"]
    steps = [srun(server_host, allocation.gpus_per_node, *server)]
    for host, ids in deal_clients(job.clients, allocation.hosts).items():
        if not ids:
            continue
        # One run directory for the whole job (the monitor finds every process of it by that
        # marker); each node logs in a directory of its own.
        node = [f"{root}/launchers/slurm/node.sh", "--superlink", f"{server_host}:{job.port}",
                "--run-dir", run_dir, "--log-dir", f"{run_dir}/{host}", "--task", job.task,
                "--num-partitions", str(job.clients), "--clients", ",".join(map(str, ids))]
        if not job.mp:
            node.append("--no-mp")
        if job.tls:
            node += ["--certs", certs]
        steps.append(srun(host, allocation.gpus_per_node, *node, "--", *job.client_args))
    return steps


def render(steps: list[list[str]]) -> str:
    return "\n".join(shlex.join(step) for step in steps)


def main(argv: list[str] | None = None) -> int:
    """``python -m fedgpu.slurm CLIENTS MIN SAMPLED ROUNDS --run-dir D [...]``: print the plan (exit 2 on bad input)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="fedgpu.slurm", description="Print the srun commands of a fedgpu job.")
    for name in ("clients", "min_clients", "sampled", "rounds"):
        parser.add_argument(name, type=int)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--root", required=True, help="the fedgpu checkout (on a file system every node sees)")
    parser.add_argument("--port", type=int, default=9092)
    parser.add_argument("--task", default="digits")
    parser.add_argument("--no-mp", action="store_true")
    parser.add_argument("--tls", action="store_true")
    parser.add_argument("--server-arg", action="append", default=[], help="passed to `fedgpu server` (repeatable)")
    parser.add_argument("--client-arg", action="append", default=[], help="passed to every `fedgpu client` (repeatable)")
    args = parser.parse_args(argv)
    try:
        allocation = Allocation.from_env()
        job = JobSettings(args.clients, args.min_clients, args.sampled, args.rounds, args.run_dir, args.port, args.task,
                          not args.no_mp, args.tls, tuple(args.server_arg), tuple(args.client_arg))
        print(render(plan(allocation, job, args.root)))
    except ValueError as err:  # NotInAllocation too
        print(f"fedgpu.slurm: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
