"""A failed message as data: what happened, to which client, where to read more.

A node's failure reply is a Flower ``Error``, which carries only a code and a
reason string; the ``Failure`` travels in that reason as one readable line
followed by a JSON line, so Flower's own logs stay readable and the server
reads fields instead of parsing prose. Failures that Flower itself reports
(a node gone, a reply expired) are classified by their error code. Every line
about a failure is formatted here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from typing import Any

from flwr.app import Error

from fedgpu.flower.internals.codes import ErrorCode
from fedgpu.isolation.errors import join_reason
from fedgpu.names import FAILURE_MARK

# Flower's own error codes, as kinds a reader can count.
_FLOWER_KINDS = {
    ErrorCode.LOAD_CLIENT_APP_EXCEPTION: "ClientApp failed to load",
    ErrorCode.CLIENT_APP_RAISED_EXCEPTION: "ClientApp raised",
    # A message lives as long as the server waits for its reply (its TTL): past that, Flower says this.
    ErrorCode.MESSAGE_UNAVAILABLE: "no reply (the message expired, or its node left)",
    ErrorCode.REPLY_MESSAGE_UNAVAILABLE: "reply expired",
    ErrorCode.NODE_UNAVAILABLE: "node unavailable",
    ErrorCode.MOD_FAILED_PRECONDITION: "mod failed",
    ErrorCode.INVALID_FAB: "invalid FAB",
    ErrorCode.CLIENT_APP_CRASHED: "ClientApp crashed",
}


@dataclass(frozen=True)
class Failure:
    """One message without a usable reply."""

    kind: str  # counted by: "raised ValueError", "killed by SIGSEGV", "stopped by fedgpu after 60 s", "bad reply"
    detail: str = ""
    client: str = ""  # the node's partition id, "" where unknown
    pid: int | None = None  # the child that ran the message
    round: int | None = None
    log: str = ""  # where the details are (filled in by whoever knows the file)

    def text(self) -> str:
        """One line: kind, detail, who."""
        line = join_reason(self.kind, self.detail)
        who = ", ".join(part for part in (f"client {self.client}" if self.client != "" else "",
                                           f"child pid {self.pid}" if self.pid else "") if part)
        return f"{line} ({who})" if who else line

    def to_reason(self) -> str:
        """For a Flower ``Error``: the line for people, then the fields."""
        return f"{self.text()}\n{FAILURE_MARK}{json.dumps(asdict(self))}"

    def to_error(self, code: int = ErrorCode.CLIENT_APP_RAISED_EXCEPTION) -> Error:
        return Error(code=code, reason=self.to_reason())

    def where(self, **changes: Any) -> Failure:
        return replace(self, **changes)

    @classmethod
    def from_error(cls, error: Error) -> Failure:
        """The Failure a reply's Error carries; Flower's own errors classified by code."""
        reason = error.reason or ""
        for line in reason.splitlines():
            if line.startswith(FAILURE_MARK):
                try:
                    fields = json.loads(line[len(FAILURE_MARK) :])
                    return cls(**{key: fields[key] for key in fields if key in cls.__dataclass_fields__})
                except (ValueError, TypeError):
                    break
        first = reason.splitlines()[0].strip() if reason.strip() else ""
        kind = _FLOWER_KINDS.get(error.code, f"error code {error.code}")
        if first.startswith("Error: "):  # Flower's "Error: Node Unavailable - ..." adds nothing to the kind
            first = first[len("Error: ") :]
        return cls(kind, first)


def no_reply(timeout: object) -> Failure:
    """A message that got no reply at all: the round waited ``timeout`` seconds."""
    return Failure(f"no reply within {timeout} s")


def count_by_kind(kinds: Iterable[str]) -> str:
    """Failures counted by kind, in the order first seen: "raised ValueError x1; killed by SIGSEGV x2"."""
    counts: dict[str, int] = {}
    for kind in kinds:
        counts[kind] = counts.get(kind, 0) + 1
    return "; ".join(f"{kind} x{count}" for kind, count in counts.items())
