"""Errors raised in the parent for what happened in a child.

Each names what happened in two parts: ``kind``, short and stable enough to
count failures by ("raised ValueError", "killed by SIGSEGV", "stopped by
fedgpu after 60 s"), and ``detail``. ``reason`` is the two in one line. A
death names who caused it: fedgpu (a timeout, a shutdown) or not fedgpu, and
an exit status nobody saw is reported as unknown, never guessed.
"""

from __future__ import annotations

import signal

from fedgpu.errors import FedgpuError


class IsolationError(FedgpuError):
    """A call run in a child did not return a value."""

    def __init__(self, message: str, *, pid: int | None = None) -> None:
        super().__init__(message)
        self.pid = pid

    @property
    def kind(self) -> str:
        """What happened, short: failures are counted by it."""
        return type(self).__name__

    @property
    def detail(self) -> str:
        return str(self).splitlines()[0] if str(self) else ""

    @property
    def reason(self) -> str:
        """One line for reports: the kind, then the detail."""
        return join_reason(self.kind, self.detail)


def join_reason(kind: str, detail: str) -> str:
    """"killed by SIGKILL, not by fedgpu (...)", "raised ValueError: bad batch": the one way to join them."""
    if not detail:
        return kind
    if detail.startswith("("):
        return f"{kind} {detail}"
    return f"{kind}{', ' if detail.startswith('not by ') else ': '}{detail}"


class RemoteTraceback(Exception):
    """Carries a child's formatted traceback as the cause of the re-raised error."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text


class ChildRaised(IsolationError):
    """The callable raised in the child; the child's traceback travels with it."""

    _not_pickled = ("original",)  # the child's own exception object: its class may not exist elsewhere

    def __init__(
        self,
        type_name: str,
        message: str,
        remote_traceback: str,
        *,
        pid: int | None = None,
        original: BaseException | None = None,
    ) -> None:
        super().__init__(
            f"{type_name}: {message}\n\nTraceback in child (pid {pid}):\n{remote_traceback}",
            pid=pid,
        )
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback
        self.original = original

    @property
    def kind(self) -> str:
        return f"raised {self.type_name}"

    @property
    def detail(self) -> str:
        return self.message.splitlines()[0] if self.message else ""


class ChildDied(IsolationError):
    """The child exited without sending a result (signal, os._exit, OOM kill, stopped by us).

    ``returncode`` is None when nobody could see the exit status (the zygote
    that forked the child is gone). ``stopped_by`` says why fedgpu stopped it
    ("shutting down"), None when something else ended it.
    """

    def __init__(
        self, returncode: int | None, *, pid: int | None = None, detail: str = "", stopped_by: str | None = None
    ) -> None:
        self.returncode = returncode
        self.signal_name = signal_name(-returncode) if returncode is not None and returncode < 0 else None
        self.stopped_by = stopped_by
        self.extra = detail
        text = f"child (pid {pid}) {describe_returncode(returncode, stopped_by)} without sending a result"
        super().__init__(f"{text}{': ' + detail if detail else ''}", pid=pid)

    @property
    def kind(self) -> str:
        if self.stopped_by:
            return f"stopped by fedgpu ({self.stopped_by})"
        if self.returncode is None:
            return "exit status unknown"
        if self.signal_name:
            return f"killed by {self.signal_name}"
        return f"exit code {self.returncode}"

    @property
    def detail(self) -> str:
        if self.stopped_by:
            return ""
        if self.returncode is None:
            return "the zygote that forked it is gone"
        cause = _likely_cause(self.returncode)
        parts = [f"not by fedgpu ({cause})" if self.signal_name else ""]
        if self.extra:
            parts.append(self.extra)
        return ", ".join(part for part in parts if part)



class ChildTimedOut(IsolationError):
    """The child ran past its deadline and fedgpu stopped it with its process group."""

    def __init__(self, timeout: float, *, pid: int | None = None) -> None:
        self.timeout = timeout
        super().__init__(
            f"child (pid {pid}) ran past its timeout of {timeout:g} s; "
            "fedgpu stopped its process group (SIGTERM, then SIGKILL)",
            pid=pid,
        )

    @property
    def kind(self) -> str:
        return f"stopped by fedgpu after {self.timeout:g} s"

    @property
    def detail(self) -> str:
        return ""


# Why a signal most likely arrived, for the people reading the error.
_LIKELY_CAUSE = {
    signal.SIGKILL: "likely the kernel's OOM killer, or a `kill -9`",
    signal.SIGSEGV: "likely a crash in native code (CUDA, a C extension)",
    signal.SIGBUS: "likely a bad memory access in native code, or /dev/shm full",
    signal.SIGABRT: "likely a native assertion or abort()",
    signal.SIGFPE: "likely an arithmetic fault in native code",
    signal.SIGTERM: "someone asked it to stop",
    signal.SIGINT: "an interrupt (Ctrl-C)",
}


def _likely_cause(returncode: int) -> str:
    return _LIKELY_CAUSE.get(-returncode, "cause unknown")  # type: ignore[call-overload]


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def describe_returncode(returncode: int | None, stopped_by: str | None = None) -> str:
    """'was killed by SIGKILL, not by fedgpu (likely ...)', 'was stopped by fedgpu (...)',
    'exited with code 3' or 'exited with an unknown status'."""
    if stopped_by:
        return f"was stopped by fedgpu ({stopped_by})"
    if returncode is None:
        return "exited with an unknown status (the zygote that forked it is gone)"
    if returncode < 0:
        return f"was killed by {signal_name(-returncode)}, not by fedgpu ({_likely_cause(returncode)})"
    return f"exited with code {returncode}"
