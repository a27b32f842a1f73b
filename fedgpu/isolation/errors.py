"""Errors raised in the parent for what happened in a child."""

from __future__ import annotations

import signal


class IsolationError(RuntimeError):
    """A call run in a child did not return a value."""

    def __init__(self, message: str, *, pid: int | None = None) -> None:
        super().__init__(message)
        self.pid = pid

    @property
    def reason(self) -> str:
        """A short machine-friendly kind of failure, for reports."""
        return type(self).__name__


class RemoteTraceback(Exception):
    """Carries a child's formatted traceback as the cause of the re-raised error."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text


class ChildRaised(IsolationError):
    """The callable raised in the child; the child's traceback travels with it."""

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
    def reason(self) -> str:
        return f"raised {self.type_name}: {self.message}"


class ChildDied(IsolationError):
    """The child exited without sending a result (signal, os._exit, OOM kill)."""

    def __init__(self, returncode: int, *, pid: int | None = None, detail: str = "") -> None:
        self.returncode = returncode
        self.signal_name = signal_name(-returncode) if returncode < 0 else None
        text = f"child (pid {pid}) {describe_returncode(returncode)} without sending a result"
        super().__init__(f"{text}{': ' + detail if detail else ''}", pid=pid)

    @property
    def reason(self) -> str:
        if self.signal_name:
            return f"killed by {self.signal_name}"
        return f"exit code {self.returncode}"


class ChildTimedOut(IsolationError):
    """The child ran past its timeout and was killed with its process group."""

    def __init__(self, timeout: float, *, pid: int | None = None) -> None:
        self.timeout = timeout
        super().__init__(
            f"child (pid {pid}) ran past its timeout of {timeout:g} s; "
            "its process group was sent SIGTERM, then SIGKILL",
            pid=pid,
        )

    @property
    def reason(self) -> str:
        return f"timeout after {self.timeout:g} s"


# Why a signal most likely arrived, for the people reading the error.
_LIKELY_CAUSE = {
    signal.SIGKILL: "the kernel's OOM killer or a `kill -9`",
    signal.SIGSEGV: "a crash in native code (CUDA, a C extension)",
    signal.SIGBUS: "a bad memory access in native code, or /dev/shm full",
    signal.SIGABRT: "a native assertion or abort()",
    signal.SIGFPE: "an arithmetic fault in native code",
    signal.SIGTERM: "someone asked it to stop",
    signal.SIGINT: "an interrupt (Ctrl-C)",
}


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def describe_returncode(returncode: int) -> str:
    """'was killed by SIGKILL (likely ...)' or 'exited with code 3'."""
    if returncode < 0:
        signum = -returncode
        cause = _LIKELY_CAUSE.get(signum)  # type: ignore[call-overload]
        likely = f" (likely {cause})" if cause else ""
        return f"was killed by {signal_name(signum)}{likely}"
    return f"exited with code {returncode}"
