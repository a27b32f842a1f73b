"""run.sh and fedgpu: bad input is one line and exit 2; signals stop everything."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fedgpu.flower.internals.marks import SUPERNODE_REGISTERED_MARK

from helpers import (
    FEDGPU,
    PLUGINS,
    RUN_SH,
    call_children,
    ended_output,
    free_port,
    kill_leftovers,
    private_temp,
    processes_with_env,
    read_or_empty,
    start_run_sh,
    stop_and_check,
    wait_for,
)

RUN_SH_BAD_INPUT = [
    (["abc"], "clients must be a whole number"),
    (["0"], "clients must be a whole number"),
    (["3", "-1"], "unknown option -1"),
    (["3", "2.5"], "min must be a whole number"),
    (["3", "4"], "min (4) must not exceed clients (3)"),
    (["3", "3", "4"], "sampled (4) must not exceed clients (3)"),
    (["3", "3", "2", "0"], "rounds must be a whole number"),
    (["1", "2", "3", "4", "5"], "too many arguments"),
    (["--bogus"], "unknown option --bogus"),
    (["2", "2", "1", "1", "--task"], "option --task needs a value"),
    (["2", "2", "1", "1", "--port", "99999"], "Invalid value for '--port': 99999 is not in the range 1<=x<=65535."),
    (["2", "2", "1", "1", "--isolation", "fork"],
     "Invalid value for '--isolation': 'fork' is not one of 'zygote', 'spawn'."),
    (["2", "2", "1", "1", "--gpus", "0", "--no-mp"],
     "--gpus needs --mp: without it the node itself holds the GPU it first used"),
    (["2", "2", "1", "1", "--gpus", "0,,1"], "--gpus must be GPU indices"),
    (["2", "2", "1", "1", "--placement", "packed"],
     "Invalid value for '--placement': 'packed' is not one of 'free', 'round-robin'."),
    (["2", "2", "1", "1", "--gpu-mem", "0"], "Invalid value for '--gpu-mem': 0.0 is not in the range x>0."),
    (["2", "2", "1", "1", "--admission-timeout", "soon"],
     "Invalid value for '--admission-timeout': 'soon' is not a valid float range."),
    # The server's own checks, run by run.sh before anything starts:
    (["2", "2", "1", "1", "--task", "cifar10", "--data-files", "/nonexistent/cifar"],
     "--data-files /nonexistent/cifar: not found"),
    (["2", "2", "1", "1", "--task", "cifar10"],
     "downloads uoft-cs/cifar10 from the Hugging Face Hub, which is unreachable"),
    (["2", "2", "1", "1", "--lr", "-3"], "'--lr': -3.0 is not in the range x>0"),
    (["2", "2", "1", "1", "--partitioner", "zipf"], "'--partitioner': 'zipf' is not one of 'iid', 'dirichlet'"),
    (["2", "2", "1", "1", "--task", "vit-flowers", "--task-option", "weights=bogus"],
     "task vit-flowers: weights must be one of IMAGENET1K_V1, none"),
    (["2", "2", "1", "1", "--task-option", "nonsense"], "--task-option 'nonsense': expected KEY=VALUE"),
    (["2", "2", "1", "1", "--task-option", "colour=red"], "task 'digits' got unknown option(s): colour"),
    # Numbers are read as text: no wrap-around, no silent default.
    (["18446744073709551617", "2", "1", "1"], "clients must be at most 999999, got '18446744073709551617'"),
    (["2", "2", "1", "1", "--port", ""], "Invalid value for '--port': '' is not a valid integer range."),
    # A host that cannot hold the clients is refused with the estimate (--force overrides).
    (["100000", "1", "1", "1"], "100000 client nodes need about"),
    # The client nodes' own options, checked before anything starts:
    (["2", "2", "1", "1", "--timeout", "-5"], "'--timeout': -5.0 is not in the range x>0"),
    (["2", "2", "1", "1", "--start-timeout", "0"], "'--start-timeout': 0.0 is not in the range x>0"),
    # A task module that exists but does not import (tests/plugins/broken_task.py):
    (["2", "2", "1", "1", "--task", "broken_task:BrokenDigits"],
     "task 'broken_task:BrokenDigits' does not load: raised ModuleNotFoundError: No module named 'no_such_dependency'"),
]


@pytest.mark.parametrize(("args", "message"), RUN_SH_BAD_INPUT, ids=[" ".join(a) for a, _ in RUN_SH_BAD_INPUT])
def test_run_sh_rejects_bad_input(tmp_path: Path, args: list[str], message: str) -> None:
    run_dir = tmp_path / "run"
    # No network here, as in CI: HF_HUB_OFFLINE makes that certain for the download case.
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(PLUGINS), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([str(RUN_SH), "--run-dir", str(run_dir), *args], capture_output=True, text=True, timeout=120,
                          env=env)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("run.sh: ") and message in lines[0], done.stderr
    assert not run_dir.exists(), "nothing is created for bad input"


def test_run_sh_unknown_task_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [str(RUN_SH), "2", "2", "1", "1", "--task", "nosuchtask", "--run-dir", str(run_dir)],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown task 'nosuchtask'" in lines[0], done.stderr
    assert not processes_with_env("FEDGPU_RUN_DIR", str(run_dir))


def _port_in_use() -> tuple[socket.socket, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock, sock.getsockname()[1]


FEDGPU_BAD_INPUT = [
    (["server", "--rounds", "0"], "--rounds"),
    (["server", "--sampled", "x"], "--sampled"),
    (["server", "--task", "bogus"], "unknown task 'bogus'"),
    (["server", "--task", "nosuch.module:Task"], "module 'nosuch.module' not found"),
    (["server", "--partitioner", "zipf"], "--partitioner"),
    (["server", "--no-such-flag"], "--no-such-flag"),
    (["client", "--superlink", "127.0.0.1:9", "--partition-id", "3", "--num-partitions", "2"],
     "must be below --num-partitions"),
    (["client", "--superlink", "nocolon", "--partition-id", "0", "--num-partitions", "2"], "not HOST:PORT"),
    (["client", "--superlink", "127.0.0.1:9", "--num-partitions", "2"], "--partition-id"),
    (["client", "--mp", "--superlink", "127.0.0.1:9", "--partition-id", "0", "--num-partitions", "2",
      "--zygote", "/nonexistent/z"],
     "--zygote /nonexistent/z: no such directory"),
    (["zygote", "--dir", "/tmp", "--task", "bogus"], "unknown task 'bogus'"),
    (["zygote", "--dir", "/tmp", "--task", "digits", "--run-data", '{"task": "cifar10", "partitions": 2}'],
     '--run-data: expected {"task": one of --task, "options": {...}, "partitions": N >= 1}'),
    (["zygote", "--dir", "/tmp"],
     "--dir /tmp: directory /tmp is open to group or others (mode 1777); it must be a private directory (mode 0700)"),
    (["zygote", "--dir", "/etc/passwd/sub"], "--dir /etc/passwd/sub: cannot create /etc/passwd/sub: Not a directory"),
    (["client", "--mp", "--superlink", "127.0.0.1:9", "--partition-id", "0", "--num-partitions", "2",
      "--zygote", "/tmp"],
     "--zygote /tmp: directory /tmp is open to group or others (mode 1777); "
     "it must be a private directory (mode 0700)"),
    (["client", "--mp", "--superlink", "127.0.0.1:9", "--partition-id", "0", "--num-partitions", "2",
      "--timeout", "-5"],
     "'--timeout': -5.0 is not in the range x>0"),
    (["server", "--ssl-certfile", "/etc/passwd"],
     "TLS needs all three of --ssl-ca-certfile, --ssl-certfile and --ssl-keyfile"),
    (["server", "--auth-public-keys", "/etc/passwd"], "--auth-public-keys needs TLS"),
    (["server", "--ssl-ca-certfile", "/nonexistent/ca.crt"],
     "'--ssl-ca-certfile': File '/nonexistent/ca.crt' does not exist"),
    (["client", "--superlink", "127.0.0.1:9", "--partition-id", "0", "--num-partitions", "2",
      "--auth-private-key", "/etc/passwd"],
     "--auth-private-key needs TLS (--root-certificates)"),
    (["client", "--mp", "--superlink", "127.0.0.1:9", "--partition-id", "0", "--num-partitions", "2", "--gpus", "0,x"],
     "--gpus must be GPU indices"),
    (["client", "--superlink", "127.0.0.1:9", "--partition-id", "0", "--num-partitions", "2", "--gpus", "0"],
     "--gpus needs --mp"),
    (["server", "--gpus", "99"], "--gpus 99"),  # no GPU here: NVML says so; on a GPU host: no GPU 99
    (["server", "--placement", "packed"], "--placement"),
    (["server", "--gpu-mem", "-5"], "--gpu-mem"),
    (["report", "/nonexistent/run"], "/nonexistent/run: not a run directory"),
    (["report", "a", "b", "c"], "one or two run directories"),
    (["server", "--task", "cifar10", "--data-files", "/nonexistent/cifar"],
     "--data-files /nonexistent/cifar: not found: /nonexistent/cifar"),
    (["server", "--task", "cifar10"],
     "task cifar10 downloads uoft-cs/cifar10 from the Hugging Face Hub, which is unreachable (HF_HUB_OFFLINE is set)"),
    (["client", "--superlink", "127.0.0.1:1", "--partition-id", "0", "--num-partitions", "1", "--max-wait-time", "1"],
     "cannot reach the SuperLink at 127.0.0.1:1 within 1 s: Connection refused"),
    (["client", "--superlink", "127.0.0.1:9", "--partition-id", "0", "--num-partitions", "2", "--node-config", "batch"],
     "--node-config: 'batch' is not key=value"),
    (["client", "--superlink", "127.0.0.1:9", "--partition-id", "0", "--num-partitions", "2",
      "--node-config", "lr=fast"],
     "--node-config: lr=fast: the value must be a bool, a number or a \"quoted string\""),
    (["client", "--superlink", "127.0.0.1:9", "--partition-id", "0", "--num-partitions", "2",
      "--node-config", "partition-id=1"],
     "--node-config: partition-id comes from its own option"),
    (["bogus-command"], "bogus-command"),
    (["server", "--task", "vit-flowers", "--task-option", "weights=none"],
     "task vit-flowers downloads nelorth/oxford-flowers from the Hugging Face Hub, which is unreachable"),
    (["server", "--task", "vit-flowers", "--data-files", "/nonexistent/flowers"],
     "--data-files /nonexistent/flowers: not found"),
    (["server", "--task", "vit-flowers", "--task-option", "partitions=-2"], "partitions must be > 0, got '-2'"),
    (["server", "--task", "text-imdb", "--data-files", "/nonexistent/imdb"],
     "--data-files /nonexistent/imdb: not found"),
    (["server", "--task", "text-imdb", "--task-option", "max_length=2"], "task text-imdb: max_length must be >= 8"),
    (["bench-models", "--models", "resnet18,no_such_net"], "--models: unknown model(s) no_such_net"),
    (["bench-models", "--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    (["bench-models", "--models", "vit_b_16", "--image-size", "100"],
     "--image-size 100: ViT models need a multiple of 16"),
    (["bench-models", "--batch-size", "1"], "'--batch-size': 1 is not in the range x>=2"),
    (["bench-models", "--csv", "/proc/fedgpu.csv"], "--csv /proc/fedgpu.csv: not writable"),
    # fedgpu run's roles (a Slurm job's steps):
    (["run", "4", "--role", "nodes"], "--role nodes needs --superlink HOST:PORT"),
    (["run", "4", "--role", "nodes", "--superlink", "h:1", "--partitions", "0,4"],
     "--partitions: partition 4 is not below the 4 clients"),
    (["run", "4", "--role", "nodes", "--superlink", "h:1", "--port", "9"], "--port is for the server's SuperLink"),
    (["run", "4", "--role", "server", "--superlink", "h:1"],
     "--superlink is for --role nodes (--role server starts the SuperLink)"),
    (["run", "4", "--role", "server", "--tls"],
     "--tls makes certificates for 127.0.0.1 only; with --role server give --certs DIR"),
    (["run", "4", "--role", "server", "--certs", "/nonexistent"], "--certs /nonexistent: no ca.crt there"),
]


@pytest.mark.parametrize(("args", "message"), FEDGPU_BAD_INPUT, ids=[" ".join(a) for a, _ in FEDGPU_BAD_INPUT])
def test_fedgpu_rejects_bad_input(tmp_path: Path, args: list[str], message: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([str(FEDGPU), *args], capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedgpu: error: ") and message in lines[0], done.stderr


def test_fedgpu_server_port_in_use(tmp_path: Path) -> None:
    sock, port = _port_in_use()
    with sock:
        done = subprocess.run([str(FEDGPU), "server", "--port", str(port), "--run-dir", str(tmp_path / "r")],
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == f"fedgpu: error: port {port} on 127.0.0.1 is in use"


def test_run_sh_port_in_use_and_unwritable_run_dir(tmp_path: Path) -> None:
    sock, port = _port_in_use()
    with sock:
        done = subprocess.run([str(RUN_SH), "2", "2", "1", "1", "--port", str(port), "--run-dir", str(tmp_path / "r")],
                              capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr.strip()) == (2, f"run.sh: port {port} on 127.0.0.1 is in use")
    assert not (tmp_path / "r").exists()
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    done = subprocess.run([str(RUN_SH), "2", "2", "1", "1", "--run-dir", str(blocker / "run")], capture_output=True,
                          text=True, timeout=60)
    assert (done.returncode, done.stderr.strip()) == (
        2, f"run.sh: run directory {blocker / 'run'} is not writable: Not a directory")


def test_fedgpu_server_unwritable_run_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    done = subprocess.run([str(FEDGPU), "server", "--port", str(free_port()), "--run-dir", str(blocker / "run")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "is not writable" in lines[0], done.stderr


# `fedgpu run` with the race made certain: the first port the launcher picks is bound by another program before
# the SuperLink binds it (a listening socket of this process, which the launcher is).
TAKEN_FIRST_PICK = """
import socket, sys
import fedgpu.net
from fedgpu.cli import main

taken = socket.socket()
taken.bind(("127.0.0.1", 0))
taken.listen()
picks, pick = [taken.getsockname()[1]], fedgpu.net.free_port
fedgpu.net.free_port = lambda host="127.0.0.1": picks.pop() if picks else pick(host)
main(sys.argv[1:])
"""


@pytest.mark.e2e
def test_a_picked_port_taken_before_the_superlink_binds_it_is_picked_again(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    temp, env = private_temp(tmp_path)
    script = tmp_path / "taken_first_pick.py"
    script.write_text(TAKEN_FIRST_PICK)
    proc = subprocess.Popen([sys.executable, str(script), "run", "2", "--rounds", "3", "--run-dir", str(run_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, env=env)
    logs = [run_dir / f"client-{i}.log" for i in range(2)]

    def registered() -> bool:
        return all(SUPERNODE_REGISTERED_MARK in read_or_empty(log) for log in logs)

    if not wait_for(lambda: registered() or proc.poll() is not None, timeout=180) or proc.poll() is not None:
        kill_leftovers(run_dir)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the client nodes never registered {ended_output(proc)} {read_or_empty(run_dir / 'server.log')}")
    again = re.search(r"port (\d+) was taken before the SuperLink bound it; starting again on port (\d+)",
                      read_or_empty(run_dir / "server.log"))
    assert again and again[1] != again[2], read_or_empty(run_dir / "server.log")
    # The nodes were sent to the port picked again, and registered there.
    nodes = [cmd for cmd in processes_with_env("FEDGPU_RUN_DIR", str(run_dir)).values() if " client " in cmd]
    assert len(nodes) == 2 and all(f"--superlink 127.0.0.1:{again[2]} " in cmd for cmd in nodes), nodes
    stop_and_check(proc, run_dir, int(again[2]), signal.SIGTERM, to_group=False, temp=temp)


@pytest.mark.e2e
def test_ctrl_c_mid_training_stops_everything(tmp_path: Path) -> None:
    run_dir, port = tmp_path / "run", free_port()
    temp, env = private_temp(tmp_path)
    # Many local epochs: each child trains for seconds, long enough to be seen.
    proc = start_run_sh(["3", "3", "2", "3", "--local-epochs", "40", "--port", str(port), "--run-dir", str(run_dir)],
                        env=env)
    # Mid-training: a node has handed a train message to a child that has not answered
    # (a zygote's idle spare alone does not count), and that child is alive.
    def child_is_training() -> bool:
        for log in run_dir.glob("client-*.log"):
            text = log.read_text(errors="replace")
            if text.count("train message: running in a child") > text.count("train done in child"):
                return bool(call_children(run_dir))
        return False

    # A run that ended on its own (it failed) ends the wait too: it is said with its output at once.
    if not wait_for(lambda: child_is_training() or proc.poll() is not None, timeout=180) or proc.poll() is not None:
        kill_leftovers(run_dir)
        with contextlib.suppress(ProcessLookupError):  # run.sh's group may be gone
            os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"no training child appeared {ended_output(proc)}")
    stop_and_check(proc, run_dir, port, signal.SIGINT, to_group=True, temp=temp)


@pytest.mark.e2e
def test_sigterm_before_round_one_stops_everything(tmp_path: Path) -> None:
    run_dir, port = tmp_path / "run", free_port()
    # min 3 of 3 clients, so round 1 cannot start before all connect: stop while it waits.
    temp, env = private_temp(tmp_path)
    proc = start_run_sh(["3", "3", "2", "2", "--port", str(port), "--run-dir", str(run_dir)], env=env)
    # The launcher starts the client nodes only once the SuperLink answers.
    assert wait_for(lambda: (run_dir / "client-2.log").exists(), timeout=120), "client nodes never started"
    stop_and_check(proc, run_dir, port, signal.SIGTERM, to_group=False, temp=temp)
