"""A Flower app we did not write, four ways: Flower's own quickstart-pytorch (offline data stand-in).

The same app directory (examples/quickstart-pytorch), the same nodes and rounds, in one run:
  (a) Flower's deployment runtime: a SuperLink and stock SuperNodes (a ``flwr-clientapp`` per message);
  (b) Flower's Simulation Engine (Ray), one CPU per virtual client;
  (c) ``fedgpu run APP``: fedgpu client nodes, each message in a child forked by the zygote;
  (d) the Simulation Engine with ``@isolate()`` (zygote mode) on the ClientApp's train and evaluate
      (the one change: the decorator lines; torch stays imported at the module's top, as the app has it,
      so the actors hold it too; the actor's zygote is warmed with the ClientApp's module);
  (e) the same with ``@isolate(mode="spawn")``: a fresh interpreter per call, for the choice of default.
Per setup: seconds per round (median of rounds 2 and later, from the time each ``[ROUND k/R]`` line of
the app's log reached us), wall time, and the peak host memory of every process it started (summed
PSS, and the client side alone: all but the SuperLink, the ServerApp and the launchers). GPU memory at
rest needs a GPU: here there is none.

    .venv/bin/python benchmarks/app_rounds.py [--nodes 4 --rounds 4]
"""

from __future__ import annotations

import argparse
import os
import re
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
from fedgpu.isolation.procs import stop_tree  # noqa: E402
from fedgpu.monitor.host import pss_bytes  # noqa: E402
from fedgpu.net import free_port, wait_for_health  # noqa: E402

from common import BIN, MARKER, QUIET, local_simulation_env, marked, median, report, stop_marked, table  # noqa: E402

APP = ROOT / "examples" / "quickstart-pytorch"
SERVER_SIDE = ("flower-superlink", "fedgpu.flower.internals", "flwr-serverapp", "bin/flwr ", "fedgpu run",
               "fedgpu server")
# What runs under these is server side too (SuperExec, ServerApp); under the launchers, the client nodes are not.
SERVER_ROOTS = ("flower-superlink", "fedgpu.flower.internals", "flwr-serverapp")
ROUND_LINE = re.compile(r"\[ROUND (\d+)/(\d+)\]")


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


class MemorySampler(threading.Thread):
    """Peak summed PSS of the marked processes, all of them and the client side alone."""

    def __init__(self, marker: str) -> None:
        super().__init__(daemon=True)
        self.marker, self.peak_all, self.peak_clients = marker, 0, 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(0.5):
            processes = marked(self.marker)
            server = {pid for pid, cmd in processes.items() if any(name in cmd for name in SERVER_SIDE)}
            roots = {pid for pid, cmd in processes.items() if any(name in cmd for name in SERVER_ROOTS)}
            total = clients = 0
            for pid in processes:
                size = pss_bytes(pid) or 0
                total += size
                ancestor, hops = pid, 0
                # under the SuperLink: its SuperExec, the ServerApp
                while ancestor and ancestor not in roots and hops < 20:
                    ancestor, hops = _parent(ancestor), hops + 1
                if pid not in server and ancestor not in roots:
                    clients += size
            self.peak_all, self.peak_clients = max(self.peak_all, total), max(self.peak_clients, clients)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def stream(command: list[str], env: dict[str, str], log: Path, timeout: float) -> tuple[dict[int, float], float, int]:
    """Run ``command``, timestamp each [ROUND k/R] line of its output; (round start times, end, exit code)."""
    starts: dict[int, float] = {}
    with open(log, "w") as out:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=log.parent)
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        for line in proc.stdout:
            out.write(line)
            match = ROUND_LINE.search(line)
            if match:
                starts.setdefault(int(match.group(1)), time.monotonic())
            if time.monotonic() > deadline:
                proc.kill()
                break
        code = proc.wait()
    return starts, time.monotonic(), code


def per_round(starts: dict[int, float], end: float, rounds: int) -> list[float]:
    marks = [starts.get(r) for r in range(1, rounds + 1)] + [end]
    return [b - a for a, b in zip(marks, marks[1:]) if a is not None and b is not None]


def run_deployment(work: Path, nodes: int, rounds: int, marker: str) -> dict:
    """(a) Flower's SuperLink and stock SuperNodes."""
    work.mkdir(parents=True)
    port = free_port()
    env = {**os.environ, **QUIET, MARKER: marker, "FLWR_HOME": str(work / "flwr-home"),
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    (work / "flwr-home").mkdir()
    (work / "flwr-home" / "config.toml").write_text(
        f'[superlink.local]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    sampler = MemorySampler(marker)
    sampler.start()
    started = time.monotonic()
    procs = [subprocess.Popen([str(BIN / "flower-superlink"), "--insecure", "--port", str(port),
                               "--disable-runtime-dependency-installation"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, cwd=work)]
    if not wait_for_health(f"http://127.0.0.1:{port}/health", 60, alive=lambda: procs[0].poll() is None):
        raise RuntimeError("(a): the SuperLink did not start")
    for i in range(nodes):
        procs.append(subprocess.Popen(
            [str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
             "--port", str(free_port()), "--node-config", f"partition-id={i} num-partitions={nodes}"],
            env=env, stdout=open(work / f"node-{i}.log", "w"), stderr=subprocess.STDOUT, cwd=work))
    try:
        starts, end, code = stream([str(BIN / "flwr"), "run", str(APP), "local", "--stream",
                                    "--run-config", f"num-server-rounds={rounds}"],
                                   env, work / "app.log", 3600)
    finally:
        sampler.stop()
        for proc in procs:
            stop_tree(proc.pid, 5.0)
        stop_marked(marker)
    return {"rounds": per_round(starts, end, rounds), "wall": end - started, "code": code,
            "peak_pss_mib": sampler.peak_all / 2**20, "client_pss_mib": sampler.peak_clients / 2**20}


def run_simulation(work: Path, app: Path, nodes: int, rounds: int, marker: str) -> dict:
    """(b) and (d): the Simulation Engine, one CPU per virtual client."""
    work.mkdir(parents=True)
    env = local_simulation_env(work / "flwr-home", **{MARKER: marker})
    federation = f"num-supernodes={nodes} client-resources-num-cpus=1 client-resources-num-gpus=0.0"
    sampler = MemorySampler(marker)
    sampler.start()
    started = time.monotonic()
    try:
        starts, end, code = stream([str(BIN / "flwr"), "run", str(app), "local", "--federation-config", federation,
                                    "--stream", "--run-config", f"num-server-rounds={rounds}"],
                                   env, work / "app.log", 3600)
    finally:
        sampler.stop()
        stop_marked(marker)  # `:local:` leaves its SuperLink (and Ray) running
    return {"rounds": per_round(starts, end, rounds), "wall": end - started, "code": code,
            "peak_pss_mib": sampler.peak_all / 2**20, "client_pss_mib": sampler.peak_clients / 2**20}


def run_fedgpu(work: Path, nodes: int, rounds: int, marker: str) -> dict:
    """(c) fedgpu run APP."""
    env = {**os.environ, **QUIET, MARKER: marker}
    sampler = MemorySampler(marker)
    sampler.start()
    started = time.monotonic()
    work.parent.mkdir(parents=True, exist_ok=True)
    try:
        starts, end, code = stream([str(BIN / "fedgpu"), "run", str(APP), "--nodes", str(nodes),
                                    "--run-config", f"num-server-rounds={rounds}", "--run-dir", str(work)],
                                   env, work.parent / "fedgpu-app.log", 3600)
    finally:
        sampler.stop()
        stop_marked(marker)
    return {"rounds": per_round(starts, end, rounds), "wall": end - started, "code": code,
            "peak_pss_mib": sampler.peak_all / 2**20, "client_pss_mib": sampler.peak_clients / 2**20}


def isolated_copy(work: Path, decorator_line: str = "@isolate()") -> Path:
    """The app with ``decorator_line`` under @app.train() and @app.evaluate(): nothing else changed."""
    app = work / f"isolated-app-{abs(hash(decorator_line))}"
    shutil.copytree(APP, app, ignore=shutil.ignore_patterns("__pycache__"))
    client = app / "pytorchexample" / "client_app.py"
    source = client.read_text()
    source = source.replace("from flwr.clientapp import ClientApp\n",
                            "from flwr.clientapp import ClientApp\n\nfrom fedgpu.flower import isolate\n")
    for decorator in ("@app.train()", "@app.evaluate()"):
        source = source.replace(f"{decorator}\n", f"{decorator}\n{decorator_line}\n")
    client.write_text(source)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--keep", action="store_true", help="keep the run directories")
    args = parser.parse_args()
    try:
        import ray  # noqa: F401
    except ImportError:
        raise SystemExit("app_rounds: the Simulation Engine needs flwr[simulation]: "
                         ".venv/bin/pip install -e '.[bench]'") from None
    work = Path(tempfile.mkdtemp(prefix="fedgpu-bench-app-"))
    setups = {
        "(a) Flower deployment, stock SuperNodes": lambda m: run_deployment(
            work / "deployment", args.nodes, args.rounds, m),
        "(b) Flower Simulation Engine (Ray)": lambda m: run_simulation(
            work / "simulation", APP, args.nodes, args.rounds, m),
        "(c) fedgpu run": lambda m: run_fedgpu(work / "fedgpu" / "run", args.nodes, args.rounds, m),
        "(d) Simulation Engine + @isolate() (zygote)": lambda m: run_simulation(
            work / "simulation-isolate", isolated_copy(work), args.nodes, args.rounds, m),
        "(e) Simulation Engine + @isolate(mode=\"spawn\")": lambda m: run_simulation(
            work / "simulation-spawn", isolated_copy(work, '@isolate(mode="spawn")'), args.nodes, args.rounds, m),
    }
    raw, rows = {}, []
    for name, run in setups.items():
        print(f"== {name}", file=sys.stderr, flush=True)
        result = run(uuid.uuid4().hex)
        raw[name] = result
        later = result["rounds"][1:] or result["rounds"]
        ok = "yes" if result["code"] == 0 and len(result["rounds"]) == args.rounds else f"no (exit {result['code']})"
        rows.append([name, median(later), result["wall"], result["peak_pss_mib"], result["client_pss_mib"], ok])
    body = table(["setup", "median round s (rounds 2+)", "wall s", "peak PSS MiB (all)", "peak PSS MiB (client side)",
                  "completed"], rows)
    body += (
        f"\n\n{args.nodes} nodes (virtual clients), {args.rounds} rounds of Flower's quickstart-pytorch with its data "
        "swapped for an offline stand-in; FedAvg as the app has it (every node trains, half evaluate). "
        "Wall time includes start-up. No GPU here: GPU memory at rest is not measured."
    )
    report("app_rounds", "A Flower app we did not write: four ways to run it", body, raw)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
