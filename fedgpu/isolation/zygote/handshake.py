"""The zygote's side of the handshake (drawn in ``protocol``), one non-blocking step at a time.

Every connection between accept and its complete request is a ``Pending``:
a small state machine (hello -> proof -> fds -> frame) that the serving loop
advances whenever its socket is readable, and drops (``Drop``) at the first
thing wrong or at its deadline. Nothing a connection sends is trusted before
it proved the key.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Any

from fedgpu.isolation.zygote.protocol import (
    ACCEPTED,
    FDS_MARK,
    FRAME_HEADER,
    HELLO_BYTES,
    MAGIC,
    MAX_FRAME_BYTES,
    NONCE_BYTES,
    PROOF_BYTES,
    caller_proof,
    decode_frame,
    encode_frame,
    same,
    zygote_proof,
)

HANDSHAKE_SECONDS = 2.0  # accept -> complete request; a real caller needs milliseconds
DESCRIPTOR_HEADROOM = 128  # for the listener, the selector, the spare, stdio, imported libraries
ACCEPTS_PER_ROUND = 64  # then the connections already accepted are served before more are taken
# Handshake states, least progress first: the first to go when room is needed.
STATES = ("hello", "proof", "fds", "frame")


def max_pending(descriptors: int) -> int:
    """Handshakes held at once with this many descriptors: half of what the headroom leaves.

    The other half is for the calls: each running one holds its control
    connection and a pidfd, and a handshake in its last state holds the
    caller's three descriptors too.
    """
    return max(4 * ACCEPTS_PER_ROUND, (descriptors - DESCRIPTOR_HEADROOM) // 2)


@dataclass
class Pending:
    """A connection between accept and its complete request; nothing is trusted yet."""

    conn: socket.socket
    deadline: float
    fd: int = -1  # the key in ZygoteServer.pending (conn.fileno() is -1 once closed)
    state: str = "hello"  # hello -> proof -> fds -> frame
    buffer: bytearray = field(default_factory=bytearray)
    caller_nonce: bytes = b""
    zygote_nonce: bytes = b""
    fds: list[int] = field(default_factory=list)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        self.conn.close()


class Drop(Exception):
    """This connection is done for: close it, serve the others."""


def advance_handshake(pending: Pending, key: bytes) -> dict[str, Any] | None:
    """Read what ``pending`` sent and move its handshake on: its request once complete, else None.

    Raises ``Drop`` (or OSError, ValueError) when the connection is done for.
    """
    conn = pending.conn
    if pending.state == "fds":
        try:
            data, fds, flags, _ = socket.recv_fds(conn, 1, 3)
        except (BlockingIOError, InterruptedError):
            return None
        pending.fds = list(fds)
        if data != FDS_MARK or len(fds) != 3 or flags & socket.MSG_CTRUNC:
            raise Drop
        pending.state = "frame"
        return None
    wanted = {"hello": HELLO_BYTES, "proof": PROOF_BYTES}.get(pending.state)
    if wanted is None:  # frame: header, then that many bytes
        wanted = FRAME_HEADER.size
        if len(pending.buffer) >= FRAME_HEADER.size:
            (length,) = FRAME_HEADER.unpack_from(pending.buffer)
            if length > MAX_FRAME_BYTES:
                raise Drop
            wanted += length
    try:
        chunk = conn.recv(wanted - len(pending.buffer))
    except (BlockingIOError, InterruptedError):
        return None
    if not chunk:
        raise Drop  # closed before finishing
    pending.buffer += chunk
    if len(pending.buffer) < wanted:
        return None
    data, pending.buffer = bytes(pending.buffer), bytearray()
    if pending.state == "hello":
        if not data.startswith(MAGIC):
            raise Drop
        pending.caller_nonce = data[len(MAGIC) :]
        pending.zygote_nonce = os.urandom(NONCE_BYTES)
        send_now(conn, pending.zygote_nonce + zygote_proof(key, pending.caller_nonce, pending.zygote_nonce))
        pending.state = "proof"
    elif pending.state == "proof":
        if not same(data, caller_proof(key, pending.caller_nonce, pending.zygote_nonce)):
            raise Drop
        send_now(conn, ACCEPTED)
        pending.state = "fds"
    elif len(data) > FRAME_HEADER.size:  # the whole frame is in
        request = decode_frame(data[FRAME_HEADER.size :])
        if not isinstance(request.get("env"), dict) or not isinstance(request.get("cwd"), str):
            raise Drop
        return request
    else:
        pending.buffer = bytearray(data)  # the header alone: now read the body
    return None


def send_now(conn: socket.socket, data: bytes) -> None:
    """A small write to a non-blocking socket; a peer that cannot take it is dropped."""
    if conn.send(data) != len(data):
        raise Drop


def try_send(conn: socket.socket, message: dict[str, Any]) -> bool:
    try:
        send_now(conn, encode_frame(message))
        return True
    except (Drop, OSError):
        return False
