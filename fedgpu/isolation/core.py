"""Run a callable in a short-lived child and get its result back.

One ``Isolator`` owns every child it starts: it detects a child's death through
its process sentinel (a pidfd), not by polling; it stops a child by its process
group (TERM, a grace period, then KILL), so grandchildren go too; and its
``shutdown`` is the one place that tears down whatever is still running.

Modes are launchers: ``zygote`` forks each call from a warm process that has
imported everything but never touched CUDA (``fedgpu.isolation.zygote``);
``spawn`` starts a fresh interpreter per call; ``none`` runs the call in this
process (the naive baseline). Each launcher hands back a child with the same
operations.

No descendant outlives its call: the child leads its own process group and is
a child subreaper, so whatever it starts (even in a session of its own) stays
below it and is killed when the call ends; what a crashed child leaves goes to
the zygote, a subreaper too, or is found by the call's marker in its
environment (``FEDGPU_CALL``).
"""

from __future__ import annotations

import pickle
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from fedgpu.isolation.errors import ChildDied, ChildRaised, ChildTimedOut, RemoteTraceback
from fedgpu.isolation.launchers import InProcessLauncher, SpawnLauncher
from fedgpu.isolation.procs import (
    kill_marked,
    stop_groups,
)
from fedgpu.names import CALL_MARKER

DEFAULT_GRACE_SECONDS = 3.0


@dataclass(frozen=True)
class Outcome:
    """A call's value and what it cost."""

    value: Any
    pid: int
    seconds: float  # call sent -> result received, as the parent saw it
    work_seconds: float  # inside the callable, as the child measured it
    max_rss_kib: int  # the child's peak resident memory
    mode: str
    facts: Mapping[str, Any] = field(default_factory=dict)  # what registered hooks measured in the child (see facts)

    @property
    def gpu_peak_bytes(self) -> int:
        """The child's peak GPU memory, if it was given a GPU to measure: the fact GPU placement registers."""
        return int(self.facts.get("gpu_peak_bytes", 0))


class Child(Protocol):
    """A started child, as the Isolator drives it."""

    pid: int
    max_rss_kib: int  # known once it has exited; 0 if not
    stopped_by: str | None  # why fedgpu stopped it, if it did

    @property
    def sentinel(self) -> int | None:
        """A descriptor readable once the child has exited (None: poll ``wait_exit``)."""

    def exchange(self, call: tuple, timeout: float | None) -> Any:
        """Run ``call`` (fn, args, kwargs): the child's reply ``(status, *body, facts)``, None if it died first.

        Raises ChildTimedOut past ``timeout`` seconds.
        """

    def wait_exit(self, timeout: float | None) -> bool:
        """True once the child has exited (it may stay unreaped)."""

    def stop(self, grace: float) -> None:
        """TERM the child's process group, wait ``grace``, KILL what is left."""

    def finish(self) -> int | None:
        """Kill leftovers of the group, reap, release; return the returncode (None: unknown)."""


class Launcher(Protocol):
    """Starts children of one mode."""

    name: str

    def start(self, env: Mapping[str, str]) -> Child:
        """A new child, ready for its call, with ``env`` on top of ours."""

    def close(self) -> None:
        """Release what the launcher holds (a private zygote)."""


MODES = ("zygote", "spawn", "none")


def _load_exception(pickled: tuple[str, bytes] | None) -> BaseException | None:
    """The child's exception object, if its module is already loaded here."""
    if pickled is None:
        return None
    module, data = pickled
    if module != "builtins" and module not in sys.modules:
        return None
    try:
        return pickle.loads(data)
    except Exception:  # noqa: BLE001 - the formatted traceback still travels
        return None


class Isolator:
    """Runs callables in short-lived children (or in-process with mode ``none``).

    Children are started from the calling thread; on Linux a child gets SIGTERM
    when that thread ends, so call from a thread that lives as long as you do.
    """

    def __init__(
        self,
        mode: str = "zygote",
        *,
        env: Mapping[str, str] | None = None,
        grace: float = DEFAULT_GRACE_SECONDS,
        zygote: str | None = None,
        warm_ups: Sequence[str] = (),
        reap_in_background: bool = False,
    ) -> None:
        """``zygote``: a shared zygote's directory (default ``$FEDGPU_ZYGOTE``);
        without one, mode ``zygote`` starts a private zygote warmed with
        ``warm_ups`` (see ``fedgpu.isolation.zygote``).

        ``reap_in_background``: a call that answered returns at once; its
        child's exit (tearing down a process of hundreds of MiB takes tens of
        ms) is waited for, and its group stopped, by a thread of its own. The
        child stays among the live ones until then: ``shutdown`` stops it too."""
        if mode not in MODES:
            raise ValueError(f"unknown isolation mode {mode!r} (choose from {', '.join(MODES)})")
        self.mode = mode
        self.env = dict(env or {})
        self.grace = grace
        self._launcher: Launcher
        if mode == "zygote":
            from fedgpu.isolation.zygote import ZygoteLauncher

            self._launcher = ZygoteLauncher(zygote, warm_ups=warm_ups)
        else:
            self._launcher = SpawnLauncher() if mode == "spawn" else InProcessLauncher()
        self.reap_in_background = reap_in_background
        self._live: set[Child] = set()
        self._lock = threading.Lock()
        self._closed = False

    def run(
        self,
        fn: Callable[..., Any],
        args: tuple = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        on_start: Callable[[int], None] | None = None,
    ) -> Outcome:
        """Run ``fn(*args, **kwargs)`` in a child and return its Outcome.

        ``on_start(pid)`` is called once the child exists, before it gets the
        call (with this process's pid in mode ``none``): who runs what, for a
        monitor that sees only pids.

        Raises ChildRaised (with the child's traceback), ChildDied (naming the
        exit code or signal) or ChildTimedOut.
        """
        kwargs = dict(kwargs or {})
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        marker = uuid.uuid4().hex
        child = self._start({**self.env, **(env or {}), CALL_MARKER: marker})
        clean = reaping = False
        try:
            if on_start is not None:
                on_start(child.pid)
            outcome = self._call(child, fn, args, kwargs, timeout, wait_exit=not self.reap_in_background)
            clean = True
            if self.reap_in_background:
                threading.Thread(target=self._reap, args=(child, marker, True), name="fedgpu-reaper",
                                 daemon=True).start()
                reaping = True
            return outcome
        except ChildTimedOut:
            self._stop(child, "timeout")
            raise
        finally:
            if not reaping:
                self._reap(child, marker, clean)

    def _reap(self, child: Child, marker: str, clean: bool) -> None:
        """The one place a call's child is stopped and reaped: whatever ended the call (result, death,
        timeout, an argument that does not pickle), the child and everything it started do not outlive it."""
        try:
            if clean:
                child.wait_exit(self.grace)  # let it exit by itself before its group is stopped
            child.stop(self.grace)
            returncode = child.finish()
            if not clean or returncode != 0:
                kill_marked(CALL_MARKER, marker)  # a crashed child could not clean up after itself
        finally:
            with self._lock:
                self._live.discard(child)

    def shutdown(self, grace: float | None = None) -> None:
        """Stop every child still running (TERM, grace, KILL) and refuse new calls."""
        with self._lock:
            self._closed = True
            children = list(self._live)
        running = {child.pid: child for child in children if not child.wait_exit(0)}
        for child in running.values():
            child.stopped_by = child.stopped_by or "shutting down"
        stop_groups(running, self.grace if grace is None else grace,
                    exited=lambda pid, timeout: running[pid].wait_exit(timeout))
        self._launcher.close()  # a private zygote goes with us

    def __enter__(self) -> Isolator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- internals -------------------------------------------------------

    def _stop(self, child: Child, why: str) -> None:
        """Stop a child on fedgpu's own account: its death is then ours, not a crash."""
        if not child.wait_exit(0):
            child.stopped_by = child.stopped_by or why
        child.stop(self.grace)

    def _start(self, env: Mapping[str, str]) -> Child:
        with self._lock:
            if self._closed:
                raise RuntimeError("this Isolator has been shut down")
            child = self._launcher.start(env)
            self._live.add(child)
            return child

    def _call(self, child: Child, fn: Callable, args: tuple, kwargs: dict, timeout: float | None, *,
              wait_exit: bool = True) -> Outcome:
        started = time.perf_counter()
        reply = child.exchange((fn, args, kwargs), timeout)
        seconds = time.perf_counter() - started
        if reply is None:
            returncode = child.finish()
            peak = f"its peak RSS was {child.max_rss_kib / 1024:.0f} MiB" if child.max_rss_kib else ""
            raise ChildDied(returncode, pid=child.pid, detail=peak, stopped_by=child.stopped_by)
        if wait_exit:
            child.wait_exit(self.grace)  # let it exit by itself before `run` stops its group
        status, *body, facts = reply
        if status == "ok":
            work_seconds, max_rss_kib = facts.pop("work_seconds"), facts.pop("max_rss_kib")
            return Outcome(body[0], child.pid, seconds, work_seconds, max_rss_kib, self.mode, facts)
        type_name, message, text, pickled = body
        original = _load_exception(pickled)
        error = ChildRaised(type_name, message, text, pid=child.pid, original=original)
        if original is not None:
            original.__cause__ = RemoteTraceback(text)
        raise error from original
