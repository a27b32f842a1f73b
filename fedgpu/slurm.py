"""A fedgpu federation laid out over a Slurm allocation: which command runs where.

``python3 -m fedgpu.slurm`` reads the allocation from the SLURM_* variables and the
job's options, checks them, and prints the plan: one ``srun`` step per line (or, with
``--format json``, each step's host and argv, which ``launchers/slurm/run-job.sh``
starts). The server's step, ``fedgpu run --role server``, runs on the allocation's
first node; then one step per node, ``fedgpu run --role nodes``, starts that node's
zygote and its share of the client nodes. Client nodes are dealt to nodes in turn,
so every node (the server's too) gets ``clients / nodes`` of them; on a node,
children are placed on the GPUs Slurm gave it (``CUDA_VISIBLE_DEVICES``) by free
memory, through that node's ledger.

Standard library only: it runs before the job's environment exists (a dry run needs none).
"""

from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from fedgpu.errors import BadInput
from fedgpu.shape import DEFAULT_NODES, SHAPE, read_positional


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
            raise NotInAllocation(
                "not inside a Slurm allocation (no SLURM_JOB_ID / SLURM_JOB_NODELIST): submit with sbatch"
            )
        gpus = env.get("SLURM_GPUS_ON_NODE") or env.get("SLURM_GPUS_PER_NODE") or "0"
        count = re.search(r"(\d+)\s*$", gpus)  # "4", or "a100:4"
        return cls(env["SLURM_JOB_ID"], expand_hostlist(nodelist), int(count.group(1)) if count else 0)


@dataclass(frozen=True)
class JobSettings:
    shape: tuple[int, ...]  # CLIENTS [MIN [SAMPLED [ROUNDS]]] as given; CLIENTS always
    run_dir: str
    port: int = 9092
    task: str = "digits"
    mp: bool = True
    tls: bool = False
    run_args: tuple[str, ...] = ()  # more `fedgpu run` options, for every step

    @property
    def clients(self) -> int:
        return self.shape[0]


# Options every step's `fedgpu run` gets from the plan itself; the job's own options, not a step's.
SET_BY_THE_JOB = ("--role", "--superlink", "--partitions", "--log-dir", "--host", "--certs", "--nodes", "--app",
                  "--simulation")


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
    return ["srun", "--nodes=1", "--ntasks=1", f"--nodelist={host}", *resources, "--overlap", "--kill-on-bad-exit=1",
            *command]


def plan(allocation: Allocation, job: JobSettings, root: str) -> list[dict]:
    """The job's steps, each ``{"name", "host", "argv"}``: the server's first, then one per node that has clients."""
    run_dir = str(Path(job.run_dir).absolute())
    server_host = allocation.hosts[0]
    certs = f"{run_dir}/certs"
    run = [f"{root}/.venv/bin/fedgpu", "run", *map(str, job.shape)]
    common = ["--task", job.task, "--run-dir", run_dir]
    server = [*run, "--role", "server", "--host", "0.0.0.0", "--port", str(job.port), *common]
    if job.tls:
        server += ["--certs", certs]
    steps = [{"name": "server", "host": server_host,
              "argv": srun(server_host, allocation.gpus_per_node, *server, *job.run_args)}]
    for host, ids in deal_clients(job.clients, allocation.hosts).items():
        if not ids:
            continue
        # One run directory for the whole job (the monitor finds every process of it by that
        # marker); each node logs in a directory of its own.
        node = [*run, "--role", "nodes", "--superlink", f"{server_host}:{job.port}",
                "--partitions", ",".join(map(str, ids)), *common, "--log-dir", f"{run_dir}/{host}"]
        if not job.mp:
            node.append("--no-mp")
        if job.tls:
            node += ["--certs", certs]
        steps.append({"name": f"nodes on {host}", "host": host,
                      "argv": srun(host, allocation.gpus_per_node, *node, *job.run_args)})
    return steps


def render(steps: list[dict]) -> str:
    return "\n".join(shlex.join(step["argv"]) for step in steps)


def read_job(argv: list[str], root: str, env: dict[str, str] | None = None) -> tuple[Allocation, JobSettings]:
    """``[clients] [min] [sampled] [rounds] [--task T] [--no-mp] [--tls] [--port P] [--run-dir D] [options]``.

    Other options go to every step's ``fedgpu run`` (an option followed by a word
    that is not an option takes it as its value). BadInput names the first problem.
    """
    positional: list[str] = []
    options: dict[str, str] = {}
    flags = {"--no-mp": False, "--tls": False}
    run_args: list[str] = []
    given: set[str] = set()
    shape_options = {"--" + option.replace("_", "-"): option for _, option in SHAPE}
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, has_value, value = arg.partition("=")
        if arg in flags:
            flags[arg] = True
        elif name in ("--port", "--task", "--run-dir"):
            if not has_value:
                if i + 1 >= len(argv):
                    raise BadInput(f"option {name} needs a value")
                i += 1
                value = argv[i]
            options[name] = value
        elif arg.startswith("--"):
            if name in SET_BY_THE_JOB:
                raise BadInput(f"{name} is set by the job itself for each step (see run-job.sh --help)")
            if name in shape_options:
                given.add(shape_options[name])
            run_args.append(arg)
            if not has_value and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                i += 1
                run_args.append(argv[i])
        else:
            positional.append(arg)
        i += 1
    values: dict[str, object] = {"positional": positional, **{option: None for _, option in SHAPE}}
    read_positional(values, given, numbers_only=True)
    shape = [int(values["nodes"] or DEFAULT_NODES)]
    shape += [int(values[option]) for _, option in SHAPE[1:len(positional)]]  # type: ignore[call-overload]
    port = options.get("--port", "9092")
    if not port.isascii() or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise BadInput(f"--port must be a port number from 1 to 65535, got {port!r}")
    allocation = Allocation.from_env(env)
    run_dir = options.get("--run-dir") or f"{root}/runs/slurm-{allocation.job_id}"
    return allocation, JobSettings(tuple(shape), run_dir, int(port), options.get("--task", "digits"),
                                   not flags["--no-mp"], flags["--tls"], tuple(run_args))


def main(argv: list[str] | None = None) -> int:
    """``python3 -m fedgpu.slurm --root ROOT [--format shell|json] [--prog NAME] -- JOB ARGS``: print the plan.

    Exit 2 on bad input, with one line.
    """
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    prog, fmt, root = "fedgpu.slurm", "shell", "."
    while args and args[0] in ("--root", "--format", "--prog") and len(args) >= 2:
        if args[0] == "--root":
            root = args[1]
        elif args[0] == "--format":
            fmt = args[1]
        else:
            prog = args[1]
        args = args[2:]
    if args[:1] == ["--"]:
        args = args[1:]
    try:
        if fmt not in ("shell", "json"):
            raise BadInput(f"--format must be shell or json, got {fmt!r}")
        allocation, job = read_job(args, str(Path(root).absolute()))
        run_dir = Path(job.run_dir).absolute()
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise BadInput(f"run directory {run_dir} is not writable: {err.strerror or err}") from None
        if not os.access(run_dir, os.W_OK):
            raise BadInput(f"run directory {run_dir} is not writable")
        steps = plan(allocation, job, str(Path(root).absolute()))
    except (BadInput, ValueError) as err:  # NotInAllocation too
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    if fmt == "json":
        print(json.dumps({"job": allocation.job_id, "run_dir": str(run_dir), "server_host": allocation.hosts[0],
                          "clients": job.clients, "task": job.task, "tls": job.tls, "steps": steps}))
    else:
        print(render(steps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
