"""Helpers for tests that drive real federations: find our processes, free ports."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from fedgpu.net import free_port, port_free  # noqa: F401 - re-exported for the tests

ROOT = Path(__file__).resolve().parent.parent
RUN_SH = ROOT / "run.sh"
FEDGPU = ROOT / ".venv" / "bin" / "fedgpu"
FAKE_GPU_DIR = ROOT / "tests" / "fake_gpu"  # a fake pynvml, a fake CUDA, a task that uses them
PLUGINS = ROOT / "tests" / "plugins"  # tasks that misbehave on purpose


def load_fake_pynvml():
    """The fake ``pynvml`` module (tests/fake_gpu/pynvml.py), for ``sys.modules``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("pynvml", FAKE_GPU_DIR / "pynvml.py")
    fake = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fake)
    return fake


def processes_with_env(key: str, value: str, *also: str) -> dict[int, str]:
    """pid -> command line of every process whose environment has key=value (and each ``also``)."""
    wanted = [f"{key}={value}".encode(), *(item.encode() for item in also)]
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            if all(item in environ for item in wanted):
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
    return found


def parent_pid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def call_children(run_dir: Path) -> list[int]:
    """Pids of the run's message children: spawned ones, or forked by a zygote."""
    ours = processes_with_env("FEDGPU_RUN_DIR", str(run_dir))
    zygotes = {pid for pid, cmd in ours.items() if "fedgpu.isolation.zygote" in cmd}
    return [pid for pid, cmd in ours.items() if "fedgpu.isolation.child" in cmd or parent_pid(pid) in zygotes]


def maps_torch(pid: int) -> bool | None:
    """Whether ``pid`` has torch's or CUDA's native libraries mapped (None: gone)."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return None
    return "libtorch" in maps or "libcuda" in maps


def read_or_empty(path: Path) -> str:
    """A log's text so far ("" while it does not exist)."""
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def fault_env(faults: str, faults_dir: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """The variables that make tests/plugins/fault_task.py misbehave as ``faults`` says (its docstring)."""
    pythonpath = (os.environ if base is None else base).get("PYTHONPATH", "")
    return {"FEDGPU_FAULTS": faults, "FEDGPU_FAULTS_DIR": str(faults_dir),
            "PYTHONPATH": os.pathsep.join([str(PLUGINS), pythonpath])}


class Gate:
    """Client 0's first training held in round 1 (fault_task's ``gate``) until the test opens the gate.

    For a test that must reach a run while it surely goes on: ``env(base)`` for the run, ``reached(timeout)``
    once a child waits at the gate, ``open()`` to let the run finish.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir()

    def env(self, base: dict[str, str]) -> dict[str, str]:
        return {**base, **fault_env("0=gate", self.directory, base)}

    def reached(self, timeout: float) -> bool:
        return wait_for(lambda: (self.directory / "gate-waiting").exists(), timeout)

    def open(self) -> None:
        (self.directory / "gate-open").touch()


def wait_for(predicate, timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def start_run_sh(args: list[str], **kwargs) -> subprocess.Popen:
    """run.sh in its own session, as a terminal would run a foreground job."""
    return subprocess.Popen(
        [str(RUN_SH), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **kwargs,
    )


def ended_output(proc: subprocess.Popen) -> str:
    """Once ``proc`` is killed or gone: its exit code and the end of what it printed, for a failure message."""
    out, err = proc.communicate(timeout=60)
    return f"(exit {proc.returncode}) {(out or '')[-2000:]}{(err or '')[-2000:]}"


def kill_processes_with_env(key: str, value: str) -> list[str]:
    """SIGKILL every process carrying key=value; return the command lines found."""
    left = processes_with_env(key, value)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return list(left.values())


@contextmanager
def cleaned_up(proc: subprocess.Popen, run_dir: Path):
    """Whatever happens in the block, nothing of the run outlives it (run.sh's group, the run's processes)."""
    try:
        yield proc
    finally:
        kill_leftovers(run_dir)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def kill_leftovers(run_dir: Path) -> list[str]:
    """SIGKILL any process still carrying the run's marker; return what was found."""
    return kill_processes_with_env("FEDGPU_RUN_DIR", str(run_dir))


# --- driving whole federations -----------------------------------------------

LONG_LIVED = ("fedgpu run", "fedgpu client", "fedgpu server", "flower-superlink", "fedgpu.flower.internals superlink",
              "fedgpu.flower.simulation", "flower-superexec", "flwr-serverapp")


class ProcessSampler(threading.Thread):
    """Watches every process of a run: which ones had torch or CUDA mapped."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(daemon=True)
        self.run_dir = run_dir
        self.seen: dict[int, str] = {}
        self.parent: dict[int, int] = {}
        self.torch_pids: set[int] = set()
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            for pid, cmdline in processes_with_env("FEDGPU_RUN_DIR", str(self.run_dir)).items():
                self.seen[pid] = cmdline
                parent = parent_pid(pid)
                if parent is not None:
                    # The first parent seen: an orphan is later reparented (to a subreaper, or init).
                    self.parent.setdefault(pid, parent)
                # Once seen mapped, torch stays mapped: its maps (thousands of lines) are not read again.
                if pid not in self.torch_pids and maps_torch(pid):
                    self.torch_pids.add(pid)
            self._halt.wait(0.3)

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def long_lived(self, torch: bool) -> list[str]:
        return [
            cmd for pid, cmd in self.seen.items()
            if any(name in cmd for name in LONG_LIVED) and (pid in self.torch_pids) == torch
        ]


def run_federation(run_dir: Path, *args: str, timeout: float = 420) -> tuple[int, str, ProcessSampler]:
    """./run.sh with these arguments, watched; (exit code, its output, the sampler)."""
    return run_federation_command([str(RUN_SH), *args, "--run-dir", str(run_dir)], run_dir, timeout=timeout)


def run_federation_command(argv: list[str], run_dir: Path, *, timeout: float = 420) -> tuple[int, str, ProcessSampler]:
    """A launcher command run to its end, its processes watched; nothing of the run may outlive it."""
    sampler = ProcessSampler(run_dir)
    sampler.start()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    finally:
        sampler.stop()
        leftovers = kill_leftovers(run_dir)
    assert not leftovers, f"processes outlived the launcher: {leftovers}"
    return done.returncode, done.stdout + done.stderr, sampler


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def events(run_dir: Path) -> list[dict]:
    try:
        lines = (run_dir / "events.jsonl").read_text().splitlines()
    except OSError:
        return []
    return [json.loads(line) for line in lines if line.endswith("}")]


def private_temp(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A temporary folder of the test's own for a run (TMPDIR), and the environment that gives it."""
    temp = tmp_path / "tmp"
    temp.mkdir(exist_ok=True)
    return temp, {**os.environ, "TMPDIR": str(temp)}


def stop_and_check(proc: subprocess.Popen, run_dir: Path, port: int, signum: int, to_group: bool,
                   temp: Path | None = None) -> None:
    """Signal run.sh; everything it started must be gone within 10 s, port freed (and ``temp``, its TMPDIR, empty)."""
    if to_group:  # what a terminal's Ctrl-C does: the whole foreground group
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)
    started = time.monotonic()
    try:
        proc.wait(timeout=10)
        gone = wait_for(lambda: not processes_with_env("FEDGPU_RUN_DIR", str(run_dir)),
                        10 - (time.monotonic() - started))
        left = processes_with_env("FEDGPU_RUN_DIR", str(run_dir))
    finally:
        leftovers = kill_leftovers(run_dir)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert gone and not leftovers, f"still running {time.monotonic() - started:.1f} s after the signal: {left}"
    assert time.monotonic() - started < 10
    assert proc.returncode == 128 + signum, proc.stderr.read() if proc.stderr else ""
    assert port_free(port), f"port {port} still bound"
    if temp is not None:  # torch's own per-user cache (torchinductor_<user>) is torch's, shared by every run
        assert not list(temp.glob("fedgpu-*")), (
            f"left in the temporary folder: {sorted(p.name for p in temp.iterdir())}")
