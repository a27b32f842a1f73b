"""The Slurm launcher: the commands it generates for a fake allocation, and a job run for real
on this machine with a fake `srun` that runs each step here (tests/fake_slurm/srun)."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
from pathlib import Path

import pytest

from fedgpu.slurm import Allocation, NotInAllocation, deal_clients, expand_hostlist

from helpers import ROOT, ProcessSampler, free_port, kill_leftovers, processes_with_env, read_metrics, wait_for

RUN_JOB = ROOT / "launchers" / "slurm" / "run-job.sh"
FAKE_SLURM = ROOT / "tests" / "fake_slurm"


def test_host_lists_expand_as_slurm_writes_them() -> None:
    assert expand_hostlist("gpu[01-03,07],cpu1") == ["gpu01", "gpu02", "gpu03", "gpu07", "cpu1"]
    assert expand_hostlist("node[8-10]") == ["node8", "node9", "node10"]
    assert expand_hostlist("a-1,b") == ["a-1", "b"]
    with pytest.raises(NotInAllocation):
        expand_hostlist("gpu[a-b]")
    assert deal_clients(5, ["x", "y"]) == {"x": [0, 2, 4], "y": [1, 3]}


def test_the_allocation_is_read_from_slurm_variables() -> None:
    env = {"SLURM_JOB_ID": "9", "SLURM_JOB_NODELIST": "g[1-2]", "SLURM_GPUS_PER_NODE": "a100:4"}
    assert Allocation.from_env(env) == Allocation("9", ["g1", "g2"], 4)
    with pytest.raises(NotInAllocation, match="not inside a Slurm allocation"):
        Allocation.from_env({})


def dry_run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(RUN_JOB), *args, "--dry-run"], capture_output=True, text=True, timeout=60,
                          env={**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}, **env})


def test_generated_commands_for_a_fake_allocation(tmp_path: Path) -> None:
    done = dry_run("5", "5", "3", "2", "--run-dir", str(tmp_path / "r"), "--tls", "--lr", "0.1", "--port", "9300",
                   SLURM_JOB_ID="42", SLURM_JOB_NODELIST="gpu[01-02],cpu07", SLURM_GPUS_ON_NODE="2")
    assert done.returncode == 0, done.stderr
    steps = [shlex.split(line) for line in done.stdout.splitlines()]
    assert len(steps) == 4  # the server, then one step per node
    run_dir = str(tmp_path / "r")
    for step, host in zip(steps, ["gpu01", "gpu01", "gpu02", "cpu07"]):
        assert step[:7] == ["srun", "--nodes=1", "--ntasks=1", f"--nodelist={host}", "--gpus-per-node=2", "--overlap",
                            "--kill-on-bad-exit=1"]
    fedgpu_run = [str(ROOT / ".venv" / "bin" / "fedgpu"), "run", "5", "5", "3", "2"]
    server = steps[0][7:]
    assert server[:8] == [*fedgpu_run, "--role", "server"]
    assert _option(server, "--host") == "0.0.0.0" and _option(server, "--port") == "9300"
    assert _option(server, "--run-dir") == run_dir and _option(server, "--lr") == "0.1"
    assert _option(server, "--certs") == f"{run_dir}/certs"  # made by the job before its steps start
    dealt = {}
    for step in steps[1:]:
        node = step[7:]
        assert node[:8] == [*fedgpu_run, "--role", "nodes"]
        assert _option(node, "--superlink") == "gpu01:9300" and _option(node, "--run-dir") == run_dir
        host = step[3].split("=")[1]
        assert _option(node, "--log-dir") == f"{run_dir}/{host}" and _option(node, "--certs") == f"{run_dir}/certs"
        assert _option(node, "--lr") == "0.1"  # the job's options go to every step
        dealt[host] = _option(node, "--partitions")
    assert dealt == {"gpu01": "0,3", "gpu02": "1,4", "cpu07": "2"}


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["3", "3", "2", "1"], {}, "not inside a Slurm allocation"),
        (["3", "4"], {"SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "a"}, "min (4) must not exceed clients (3)"),
        (["x"], {"SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "a"}, "clients must be a whole number"),
        (["3", "3", "2", "1"], {"SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "gpu[x]"}, "cannot read the host list"),
        (["3", "--role", "nodes"], {"SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "a"}, "--role is set by the job itself"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, args: list[str], env: dict, message: str) -> None:
    done = dry_run(*args, "--run-dir", str(tmp_path / "r"), **env)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and message in done.stderr, done.stderr


@pytest.mark.e2e
def test_a_job_runs_on_a_fake_two_node_allocation(tmp_path: Path) -> None:
    """Two "nodes" (localhost and 127.0.0.1: both this machine), srun faked to run each step here."""
    run_dir, port = tmp_path / "r", free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_JOB_ID="77", SLURM_JOB_NODELIST="localhost,127.0.0.1",
               PATH=f"{FAKE_SLURM}{os.pathsep}{env['PATH']}", FAKE_SRUN_LOG=str(tmp_path / "srun.log"))
    sampler = ProcessSampler(run_dir)
    sampler.start()
    job = subprocess.Popen([str(RUN_JOB), "4", "4", "2", "2", "--run-dir", str(run_dir), "--port", str(port)], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = job.communicate(timeout=400)
    finally:
        sampler.stop()
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        leftovers = kill_leftovers(run_dir)
    assert job.returncode == 0, out + err
    assert not leftovers, leftovers
    # The steps' launchers, the server and the client nodes are long-lived: none of them imports torch.
    roles = [cmd for cmd in sampler.long_lived(torch=False) if "fedgpu run" in cmd]
    assert len(roles) == 3 and sampler.long_lived(torch=True) == [], sampler.seen
    assert [int(r["results"]) for r in read_metrics(run_dir)] == [2, 2]
    assert "[fedgpu] round 2/2" in out
    for host, clients in (("localhost", (0, 2)), ("127.0.0.1", (1, 3))):
        assert (run_dir / host / "zygote.log").exists()  # one zygote per node
        for i in clients:
            assert "SuperNode ID" in (run_dir / host / f"client-{i}.log").read_text()
    assert len((tmp_path / "srun.log").read_text().splitlines()) == 3
    assert not processes_with_env("FEDGPU_RUN_DIR", str(run_dir))


def _option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


@pytest.mark.e2e
def test_a_job_whose_node_step_failed_stops_every_step(tmp_path: Path) -> None:
    """A client node of one node's step dies: that step stops its share and fails, and the job stops the
    other steps and exits 1 at once, naming the step, instead of waiting for the allocation's time limit."""
    run_dir, port = tmp_path / "r", free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_JOB_ID="78", SLURM_JOB_NODELIST="localhost,127.0.0.1",
               PATH=f"{FAKE_SLURM}{os.pathsep}{env['PATH']}")
    job = subprocess.Popen([str(RUN_JOB), "4", "4", "2", "1", "--run-dir", str(run_dir), "--port", str(port)], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        def node_of_partition_1() -> list[int]:
            return [pid for pid, cmd in processes_with_env("FEDGPU_RUN_DIR", str(run_dir)).items()
                    if "fedgpu client" in cmd and "--partition-id 1 " in cmd]

        assert wait_for(node_of_partition_1, 300), "the step on 127.0.0.1 never started client node 1"
        os.kill(node_of_partition_1()[0], signal.SIGKILL)
        out, err = job.communicate(timeout=60)  # its step notices within a second; every step stops within 10 s
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        leftovers = kill_leftovers(run_dir)
    assert job.returncode == 1, out + err
    assert "fedgpu: client node 1 exited with -9" in err, err
    assert "run-job.sh: step 'nodes on 127.0.0.1' exited with 1 before the server's; stopping the job" in err, err
    assert not leftovers, leftovers
