"""Which GPU a child gets, and whether it may start yet.

Before a child starts on a GPU it reserves its estimated peak in a ledger that
every client node of this host shares (a JSON file under an ``flock``). A GPU
has room when its total, minus what NVML says is used, minus what reservations
promise beyond what their children already use, covers the request. When no GPU
has room the caller waits (bounded, logged, counted) instead of starting a
child that would die of CUDA OOM. The estimate comes first from a flag, then
from the measured peaks of that task's earlier children.

The chosen GPU reaches the child as ``CUDA_VISIBLE_DEVICES=<its UUID>`` (a UUID
names the same device whatever CUDA's enumeration order) before CUDA starts.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psutil

from fedgpu.errors import FedgpuError
from fedgpu.isolation.facts import register_child_fact
from fedgpu.names import ENV_ESTIMATE, ENV_GPUS, ENV_LEDGER, ENV_POLICY, ENV_TIMEOUT, FEDGPU_GPU
from fedgpu.nvml.devices import MIB, GpuState, Nvml, open_nvml
from fedgpu.nvml.measure import gpu_peak_bytes
from fedgpu.output import write_atomic

POLICIES = ("free", "round-robin")
DEFAULT_ESTIMATE_MIB = 1024.0  # before a flag or a measured child says otherwise
LEARNED_PEAKS_KEPT = 20  # the estimate is the largest of a task's last 20 peaks ...
LEARNED_MARGIN = 0.10  # ... plus 10 %: the same call does not always peak the same
POLL_SECONDS = 0.25

# Settings travel as environment variables too, so that every process of a run
# (client nodes, the ServerApp's evaluation) places its children the same way.


# Every child of a process that places children reports its own GPU peak: the ledger learns estimates from it.
# Registered here, where it is needed, and explicitly: not as a side effect of importing the measurement.
register_child_fact("gpu_peak_bytes", gpu_peak_bytes)

class PlacementError(FedgpuError):
    """No child can be placed: bad settings, or a request no GPU could ever hold."""


class AdmissionTimedOut(FedgpuError):
    """No GPU had room for the request within the admission timeout."""


def check_placement(options: dict[str, Any], *, children: bool) -> PlacementSettings:
    """Placement settings from the CLI's options, checked against this host's GPUs; BadInput if they cannot work.

    ``children``: whether there are children to place (without isolation the node itself holds the GPU).
    """
    from fedgpu.errors import BadInput

    gpus = options["gpus"]
    if gpus is not None and not children:
        raise BadInput("--gpus needs --mp: without it the node itself holds the GPU it first used")
    try:
        parsed = parse_gpus(str(gpus)) if gpus is not None else None
    except ValueError as err:
        raise BadInput(str(err)) from None
    settings = PlacementSettings(
        gpus=parsed, policy=str(options["placement"]), estimate_mib=options["gpu_mem"],
        admission_timeout=float(options["admission_timeout"]),
    )
    if children:
        try:
            placer = GpuPlacer.from_settings(settings)  # only to check: the processes that place open their own
        except PlacementError as err:
            raise BadInput(str(err)) from None
        if placer is not None:
            placer.close()
    return settings


def parse_gpus(text: str) -> tuple[int, ...]:
    """``"0,2"`` -> (0, 2); raises ValueError naming what is wrong."""
    items = [item.strip() for item in text.split(",")]
    if not text.strip() or not all(item.isdigit() for item in items):
        raise ValueError(f"--gpus must be GPU indices separated by commas, like 0,2; got {text!r}")
    gpus = tuple(int(item) for item in items)
    if len(set(gpus)) != len(gpus):
        raise ValueError(f"--gpus lists a GPU twice: {text!r}")
    return gpus


@dataclass(frozen=True)
class PlacementSettings:
    gpus: tuple[int, ...] | None = None  # None: every GPU this process may see
    policy: str = "free"  # the GPU with most room, or round-robin over those with room
    estimate_mib: float | None = None  # a child's peak until one has been measured
    admission_timeout: float = 600.0
    ledger_dir: str | None = None  # None: default_ledger_dir()

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> PlacementSettings:
        env = dict(os.environ if env is None else env)
        return cls(
            gpus=parse_gpus(env[ENV_GPUS]) if env.get(ENV_GPUS) else None,
            policy=env.get(ENV_POLICY) or "free",
            estimate_mib=float(env[ENV_ESTIMATE]) if env.get(ENV_ESTIMATE) else None,
            admission_timeout=float(env.get(ENV_TIMEOUT) or 600.0),
            ledger_dir=env.get(ENV_LEDGER) or None,
        )

    def to_env(self) -> dict[str, str]:
        env = {ENV_POLICY: self.policy, ENV_TIMEOUT: f"{self.admission_timeout:g}"}
        if self.gpus is not None:
            env[ENV_GPUS] = ",".join(map(str, self.gpus))
        if self.estimate_mib is not None:
            env[ENV_ESTIMATE] = f"{self.estimate_mib:g}"
        if self.ledger_dir:
            env[ENV_LEDGER] = self.ledger_dir
        return env


def default_ledger_dir() -> str:
    """$FEDGPU_LEDGER, else a per-user directory in memory (every run of this user on this host shares it)."""
    if os.environ.get(ENV_LEDGER):
        return os.environ[ENV_LEDGER]
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base):
        return os.path.join(base, "fedgpu")
    shm = "/dev/shm"
    return os.path.join(shm if os.path.isdir(shm) else tempfile.gettempdir(), f"fedgpu-{os.getuid()}")


@dataclass
class Reservation:
    id: str
    gpu: int
    bytes: int
    key: str
    owner_pid: int  # the process that placed the child: the reservation dies with it
    owner_started: float
    child_pid: int | None = None
    since: float = field(default_factory=time.time)


def committed_bytes(gpu: GpuState, reservations: list[Reservation]) -> int:
    """What a GPU has promised: NVML's used memory, with each reserved child
    counted at the larger of its reservation and what it already uses."""
    committed = gpu.used
    for reservation in reservations:
        if reservation.gpu != gpu.index:
            continue
        using = gpu.processes.get(reservation.child_pid, 0) if reservation.child_pid else 0
        committed += max(reservation.bytes, using) - using
    return committed


def room_bytes(gpus: list[GpuState], reservations: list[Reservation]) -> dict[int, int]:
    """GPU index -> bytes not yet used or promised."""
    return {gpu.index: gpu.total - committed_bytes(gpu, reservations) for gpu in gpus}


def choose_gpu(
    gpus: list[GpuState], reservations: list[Reservation], need: int, policy: str, next_index: int = 0
) -> int | None:
    """The GPU index a child needing ``need`` bytes goes to, or None if none has room."""
    room = room_bytes(gpus, reservations)
    fits = [gpu.index for gpu in gpus if room[gpu.index] >= need]
    if not fits:
        return None
    if policy == "round-robin":
        order = sorted(fits)
        return next((index for index in order if index >= next_index), order[0])
    return max(fits, key=lambda index: (room[index], -index))


@dataclass
class Placement:
    """A child's GPU and its reservation, from ``acquire`` to ``release``."""

    gpu: int
    uuid: str
    reserved_bytes: int
    key: str
    reservation_id: str
    waited_seconds: float = 0.0

    def env(self) -> dict[str, str]:
        return {"CUDA_VISIBLE_DEVICES": self.uuid, FEDGPU_GPU: str(self.gpu)}


class Ledger:
    """Reservations and learned peaks of this host, shared through one locked file."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        os.makedirs(directory, mode=0o700, exist_ok=True)
        info = os.stat(directory)
        if info.st_uid != os.getuid() or info.st_mode & 0o077:
            raise PlacementError(f"GPU ledger directory {directory} must be ours and private (mode 0700)")
        self.path = os.path.join(directory, "gpu-ledger.json")
        self._lock_path = os.path.join(directory, "gpu-ledger.lock")

    @contextmanager
    def locked(self) -> Iterator[dict[str, Any]]:
        """The ledger's state, written back when the block ends without error."""
        with open(self._lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                state = self._load()
                yield state
                write_atomic(self.path, json.dumps(state), mode=0o600)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _load(self) -> dict[str, Any]:
        try:
            with open(self.path) as existing:
                state = json.load(existing)
        except (OSError, ValueError):
            state = {}
        state.setdefault("reservations", {})
        state.setdefault("peaks", {})
        state.setdefault("next_gpu", 0)
        # A reservation lives as long as the process that made it (its child
        # dies with that process): drop those of processes that are gone.
        state["reservations"] = {
            rid: entry
            for rid, entry in state["reservations"].items()
            if _alive(entry["owner_pid"], entry["owner_started"])
        }
        return state


def _alive(pid: int, started: float) -> bool:
    try:
        return abs(psutil.Process(pid).create_time() - started) < 1.0
    except psutil.Error:
        return False


class GpuPlacer:
    """Places each child on a GPU with room for its estimated peak, or waits."""

    def __init__(
        self,
        settings: PlacementSettings,
        nvml: Nvml,
        *,
        log: Callable[[str], None] = lambda line: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if settings.policy not in POLICIES:
            raise PlacementError(f"placement must be one of {', '.join(POLICIES)}, got {settings.policy!r}")
        self.settings = settings
        self.nvml = nvml
        self.log = log
        self._clock = clock
        self.candidates = self._candidates(settings.gpus)
        self.ledger = Ledger(settings.ledger_dir or default_ledger_dir())
        self._me = (os.getpid(), psutil.Process().create_time())

    @classmethod
    def from_settings(cls, settings: PlacementSettings, *,
                      log: Callable[[str], None] = lambda line: None) -> GpuPlacer | None:
        """A placer, or None where NVML sees no GPU (children then run on CPU)."""
        nvml, why = open_nvml()
        if nvml is None:
            if settings.gpus is not None:
                raise PlacementError(f"--gpus {','.join(map(str, settings.gpus))} given, but {why}")
            log(f"no GPU placement: {why}")
            return None
        return cls(settings, nvml, log=log)

    def _candidates(self, gpus: tuple[int, ...] | None) -> list[int]:
        if gpus is not None:
            wrong = [index for index in gpus if index >= self.nvml.count]
            if wrong:
                raise PlacementError(f"--gpus {','.join(map(str, gpus))}: this host has GPUs 0..{self.nvml.count - 1}")
            return list(gpus)
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is None:
            return list(range(self.nvml.count))
        # This process was given a subset (e.g. by a cluster scheduler): stay in it.
        indices = [self.nvml.index_of(name) for name in visible.split(",") if name.strip()]
        if not indices or None in indices:
            raise PlacementError(f"CUDA_VISIBLE_DEVICES={visible!r} names no GPU NVML can see")
        return indices  # type: ignore[return-value] - no None left

    def estimate_bytes(self, key: str, state: dict[str, Any] | None = None) -> int:
        if state is None:
            with self.ledger.locked() as state:
                return self.estimate_bytes(key, state)
        peaks = state["peaks"].get(key) or []
        if peaks:
            return int(max(peaks) * (1 + LEARNED_MARGIN))
        return int((self.settings.estimate_mib or DEFAULT_ESTIMATE_MIB) * MIB)

    def acquire(self, key: str) -> Placement:
        """Reserve room for one child of ``key`` (task/message type), waiting if no GPU has it."""
        started = self._clock()
        deadline = started + self.settings.admission_timeout
        announced = False
        while True:
            with self.ledger.locked() as state:
                need = self.estimate_bytes(key, state)
                gpus = self.nvml.sample(self.candidates)
                largest = max(gpu.total for gpu in gpus)
                if need > largest:
                    raise PlacementError(
                        f"{key}: estimated peak {need / MIB:.0f} MiB exceeds the largest GPU ({largest / MIB:.0f} MiB)"
                    )
                reservations = [Reservation(**entry) for entry in state["reservations"].values()]
                chosen = choose_gpu(gpus, reservations, need, self.settings.policy, state["next_gpu"])
                if chosen is not None:
                    reservation = Reservation(uuid.uuid4().hex, chosen, need, key, *self._me)
                    state["reservations"][reservation.id] = vars(reservation)
                    state["next_gpu"] = chosen + 1
                    gpu = next(g for g in gpus if g.index == chosen)
                    waited = self._clock() - started if announced else 0.0
                    return Placement(chosen, gpu.uuid, need, key, reservation.id, waited)
                room = ", ".join(f"GPU {index} {max(0, free) / MIB:.0f}"
                                 for index, free in room_bytes(gpus, reservations).items())
            now = self._clock()
            if now >= deadline:
                raise AdmissionTimedOut(
                    f"no GPU had {need / MIB:.0f} MiB free for {key} within {self.settings.admission_timeout:g} s "
                    f"(room in MiB: {room})"
                )
            if not announced:
                announced = True
                self.log(f"waiting for GPU memory: {key} needs {need / MIB:.0f} MiB; room in MiB: {room}")
            time.sleep(min(POLL_SECONDS, max(0.0, deadline - now)))

    def bind(self, placement: Placement, child_pid: int) -> None:
        """The child now exists: its own NVML usage counts against the reservation."""
        with self.ledger.locked() as state:
            entry = state["reservations"].get(placement.reservation_id)
            if entry is not None:
                entry["child_pid"] = child_pid

    def release(self, placement: Placement, measured_peak_bytes: int = 0) -> None:
        """The child is gone; learn from its measured peak (0: nothing measured)."""
        with self.ledger.locked() as state:
            state["reservations"].pop(placement.reservation_id, None)
            if measured_peak_bytes > 0:
                peaks = state["peaks"].setdefault(placement.key, [])
                peaks.append(int(measured_peak_bytes))
                del peaks[:-LEARNED_PEAKS_KEPT]

    def close(self) -> None:
        self.nvml.close()
