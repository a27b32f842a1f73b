"""Process plumbing: parent-death signals and process-group teardown.

Shared by the isolation core, the client node and the server, so that one
implementation decides how anything we start is stopped.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


def pythonpath_with_package() -> str:
    """``PYTHONPATH`` under which ``python -m fedgpu...`` imports this very
    package, even from a source checkout that is not installed."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.environ.get("PYTHONPATH", "")
    return root + (os.pathsep + path if path else "")


def child_environment(env: Mapping[str, str]) -> dict[str, str]:
    """Our environment with ``env`` on top, for a child that runs ``python -m fedgpu...``.

    Its bootstrap module must import even from a source checkout (``PYTHONPATH``).
    """
    return {**os.environ, "PYTHONPATH": pythonpath_with_package(), **env}


def set_parent_death_signal(signum: int = signal.SIGTERM) -> bool:
    """Ask Linux to send ``signum`` when our parent (the thread that forked us) dies.

    Returns False where unsupported. Callers must check ``os.getppid()`` right
    after, since the parent may have died before the request took effect.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def set_child_subreaper() -> bool:
    """Make orphaned descendants of ours (even in sessions of their own) ours, not init's.

    A process that started something and died leaves it to its nearest
    subreaper ancestor: so whatever a call started comes back to the process
    that can stop it. Returns False where unsupported.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def children_of(pid: int) -> list[int]:
    """The pids of ``pid``'s children, every thread's (Linux ``/proc``)."""
    children: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return children
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as listing:
                children.extend(int(word) for word in listing.read().split())
        except OSError:
            continue
    return children


def kill_orphan(pid: int) -> None:
    """SIGKILL a process left behind by a finished call, and the group it leads."""
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, signal.SIGKILL)
        except OSError:
            pass


def kill_descendants(limit_seconds: float = 1.0) -> None:
    """SIGKILL every descendant of this process and reap what comes back to us.

    For a subreaper about to exit: what its call started in other sessions is
    out of reach of a group kill, but every one of them is below us.
    """
    deadline = time.monotonic() + limit_seconds
    me = os.getpid()
    while time.monotonic() < deadline:
        found, frontier = [], children_of(me)
        while frontier:
            pid = frontier.pop()
            found.append(pid)
            frontier.extend(children_of(pid))
        if not found:
            return
        for pid in found:
            kill_orphan(pid)
        for pid in children_of(me):  # killed descendants of ours come to us: reap them
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass


def kill_marked(key: str, value: str) -> list[int]:
    """SIGKILL every process of ours whose environment holds ``key=value``; return their pids.

    The last net for what a crashed call started in a session of its own
    where no subreaper of ours caught it (spawned children): every
    descendant inherits the call's marker unless it scrubs its environment.
    """
    wanted = f"{key}={value}".encode()
    me, killed = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as environ:
                if wanted not in environ.read().split(b"\0"):
                    continue
        except OSError:
            continue
        kill_orphan(int(entry))
        killed.append(int(entry))
    return killed


def die_with_parent(expected_parent: int | None = None, signum: int = signal.SIGTERM) -> None:
    """Arrange to get ``signum`` when our parent dies; exit now if it already has."""
    set_parent_death_signal(signum)
    if expected_parent is not None and os.getppid() != expected_parent:
        os._exit(128 + signum)


def watch_parent(parent_pid: int | None) -> None:
    """``--parent-pid``: exit (SIGTERM) when that process, our parent, dies."""
    if parent_pid is not None:
        die_with_parent(parent_pid, signal.SIGTERM)


def open_sentinel(pid: int) -> int | None:
    """A file descriptor that becomes readable when ``pid`` exits (Linux pidfd).

    The process stays a zombie until reaped, so its pid and group id cannot be
    reused while we still hold it: group kills after exit are safe.
    """
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def wait_readable(fd: int, timeout: float | None) -> bool:
    """True when ``fd`` became readable within ``timeout`` seconds."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(None if timeout is None else max(0, int(timeout * 1000))))


def signal_group(pgid: int, signum: int) -> bool:
    """Send ``signum`` to process group ``pgid``; False if no member is left."""
    try:
        os.killpg(pgid, signum)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def group_alive(pgid: int) -> bool:
    """True while any process (zombies included) is in group ``pgid``."""
    return signal_group(pgid, 0)


def exited_within(pid: int, sentinel: int | None, timeout: float | None) -> bool:
    """True once our child ``pid`` has exited, within ``timeout`` seconds; it stays unreaped.

    ``sentinel``: its pidfd (``open_sentinel``), waited on; without one the
    child is peeked at without reaping.
    """
    if sentinel is not None:
        return wait_readable(sentinel, timeout)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        if deadline is not None and time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def wait_until(done: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``done()`` until it is true or ``timeout`` seconds have passed; its last answer."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


def stop_groups(
    pgids: Iterable[int],
    grace: float,
    *,
    exited: Callable[[int, float], object] | None = None,
    grace_of: Mapping[int, float] | None = None,
    signal_of: Mapping[int, int] | None = None,
) -> None:
    """Stop process groups together: TERM them all, wait up to ``grace``, then KILL what is left.

    The one way fedgpu stops what it started (children, its zygote's children,
    the processes of a run). Every group gets its TERM at once and its grace
    from then, so stopping many costs the longest grace, not their sum; each
    is KILLed once its wait ends, so nothing a group's leader started outlives
    it. A group that is already empty is left alone.

    ``exited(pgid, timeout)`` waits for a group's leader (e.g. on its pidfd);
    without it the group itself is polled until empty. ``grace_of`` and
    ``signal_of`` give a group its own grace and first signal (a server that
    writes its reports as it stops gets longer, and may get the INT it was
    sent). ``grace`` is the rest's.
    """
    started = time.monotonic()
    deadlines: dict[int, float] = {}
    for pgid in pgids:
        if not signal_group(pgid, (signal_of or {}).get(pgid, signal.SIGTERM)):
            continue
        signal_group(pgid, signal.SIGCONT)  # a stopped process acts on TERM only once it runs again
        deadlines[pgid] = started + (grace_of or {}).get(pgid, grace)
    # Soonest deadline first (in the order given among equals): each is KILLed when its own grace is up.
    for pgid in sorted(deadlines, key=deadlines.__getitem__):
        remaining = max(0.0, deadlines[pgid] - time.monotonic())
        if exited is not None:
            exited(pgid, remaining)
        else:
            wait_until(lambda: not group_alive(pgid), remaining)  # noqa: B023 - called before the loop moves on
        signal_group(pgid, signal.SIGKILL)


def stop_group(pgid: int, grace: float, exited: Callable[[float], object] | None = None) -> None:
    """``stop_groups`` for one group: SIGTERM, wait up to ``grace`` seconds, SIGKILL what is left.

    ``exited(timeout)`` waits for the group leader; without it the group
    itself is polled.
    """
    stop_groups([pgid], grace, exited=None if exited is None else lambda _pgid, timeout: exited(timeout))


def stop_tree(pid: int, grace: float) -> None:
    """TERM a process and all its descendants, the deepest first, within ``grace`` in all; KILL survivors.

    For process trees we do not lead as a group (e.g. Flower's SuperLink and
    the SuperExec and ServerApp processes it starts). Children go before their
    parents because a child's own exit may need its parent: Flower's ServerApp
    reports its end to the SuperLink as it exits, and with the SuperLink gone
    it retries for seconds.
    """
    import psutil

    deadline = time.monotonic() + grace
    try:
        levels = [[psutil.Process(pid)]]
    except psutil.NoSuchProcess:
        return
    while levels[-1]:
        below = []
        for proc in levels[-1]:
            try:
                below += proc.children()
            except psutil.NoSuchProcess:
                pass
        levels.append(below)
    for level in reversed(levels):
        for proc in level:
            try:
                proc.terminate()
            except psutil.NoSuchProcess:
                pass
        wait_until(lambda: not _living(level), max(0.0, deadline - time.monotonic()))  # noqa: B023
    survivors = _living([proc for level in levels for proc in level])
    for proc in survivors:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    wait_until(lambda: not _living(survivors), grace)


def _living(procs: list[Any]) -> list[Any]:
    """The psutil processes that still run: a zombie has exited (its parent may be the one who never reaps it)."""
    import psutil

    living = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                living.append(proc)
        except psutil.NoSuchProcess:
            pass
    return living
