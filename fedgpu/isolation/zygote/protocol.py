"""What the zygote and its callers agree on: files, trust checks, the handshake, frames.

A zygote lives in a private directory (ours, mode 0700) holding its socket
(0600), its key (0600) and a ``ready`` file. Before either side acts on
anything the other sends, both prove they know the key:

    caller -> zygote   MAGIC, caller nonce
    zygote -> caller   zygote nonce, HMAC(key, "zygote" | caller nonce | zygote nonce)
    caller -> zygote   HMAC(key, "caller" | zygote nonce | caller nonce)
    zygote -> caller   ACCEPTED

The caller also checks, before it connects, that the directory and the key are
its own user's and closed to everyone else, and that the process listening on
the socket runs as its user (``SO_PEERCRED``). Only then does it send its
environment. Everything after the handshake is a control frame: a length and a
JSON object, never a pickle.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
import stat
import struct
from typing import Any

from fedgpu.isolation.errors import IsolationError

SOCKET_NAME = "zygote.sock"
KEY_NAME = "key"
READY_NAME = "ready"  # written (atomically) once warm; holds the zygote's pid

MAGIC = b"FGZ1"
NONCE_BYTES = 32
PROOF_BYTES = hashlib.sha256().digest_size
ACCEPTED = b"\x01"
HELLO_BYTES = len(MAGIC) + NONCE_BYTES  # caller's first message
CHALLENGE_BYTES = NONCE_BYTES + PROOF_BYTES  # zygote's answer
FDS_MARK = b"F"  # the one byte that carries a call's three descriptors

FRAME_HEADER = struct.Struct("!I")
MAX_FRAME_BYTES = 4 * 1024 * 1024  # a request is an environment and a path: far below this
_PEER_CREDENTIALS = struct.Struct("3i")  # pid, uid, gid


class ZygoteError(IsolationError):
    """The zygote could not be reached or could not fork."""


class ZygoteUntrusted(ZygoteError):
    """What answers (or would answer) as our zygote is not provably ours: nothing was sent to it."""


def check_private_dir(path: str) -> os.stat_result:
    """The zygote directory is a real directory, ours, closed to group and others."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise ZygoteError(f"{path}: no such directory") from None
    except OSError as err:
        raise ZygoteUntrusted(f"{path}: {err.strerror or err}") from None
    if stat.S_ISLNK(info.st_mode):
        raise ZygoteUntrusted(f"{path} is a symbolic link, not a directory of ours")
    if not stat.S_ISDIR(info.st_mode):
        raise ZygoteUntrusted(f"{path} is not a directory")
    _check_owner_and_mode(path, info, "directory")
    return info


def check_private_file(path: str) -> None:
    """A file of the zygote's (its key): a regular file, ours, closed to group and others."""
    try:
        info = os.lstat(path)
    except OSError as err:
        raise ZygoteUntrusted(f"{path}: {err.strerror or err}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ZygoteUntrusted(f"{path} is not a regular file")
    _check_owner_and_mode(path, info, "file")


def _check_owner_and_mode(path: str, info: os.stat_result, what: str) -> None:
    if info.st_uid != os.geteuid():
        raise ZygoteUntrusted(f"{what} {path} belongs to uid {info.st_uid}, not to us (uid {os.geteuid()})")
    if info.st_mode & 0o077:
        private = "a private directory (mode 0700)" if what == "directory" else "a private file (mode 0600)"
        raise ZygoteUntrusted(
            f"{what} {path} is open to group or others (mode {stat.S_IMODE(info.st_mode):04o}); it must be {private}"
        )


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a Unix socket, as the kernel saw it."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEER_CREDENTIALS.size)
    return _PEER_CREDENTIALS.unpack(creds)[1]


def zygote_proof(key: bytes, caller_nonce: bytes, zygote_nonce: bytes) -> bytes:
    return hmac.new(key, b"zygote" + caller_nonce + zygote_nonce, hashlib.sha256).digest()


def caller_proof(key: bytes, caller_nonce: bytes, zygote_nonce: bytes) -> bytes:
    # Another label and order than the zygote's: neither proof can be replayed as the other.
    return hmac.new(key, b"caller" + zygote_nonce + caller_nonce, hashlib.sha256).digest()


def same(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


def encode_frame(message: dict[str, Any]) -> bytes:
    body = json.dumps(message).encode()
    return FRAME_HEADER.pack(len(body)) + body


def decode_frame(body: bytes) -> dict[str, Any]:
    message = json.loads(body)
    if not isinstance(message, dict):
        raise ValueError("a control frame must be a JSON object")
    return message


def recv_exact(sock: socket.socket, size: int) -> bytes:
    """Exactly ``size`` bytes from a blocking socket; EOFError if it closes first."""
    chunks, received = [], 0
    while received < size:
        chunk = sock.recv(size - received)
        if not chunk:
            raise EOFError(f"connection closed after {received} of {size} bytes")
        chunks.append(chunk)
        received += len(chunk)
    return b"".join(chunks)


def recv_frame(sock: socket.socket) -> dict[str, Any]:
    (length,) = FRAME_HEADER.unpack(recv_exact(sock, FRAME_HEADER.size))
    if length > MAX_FRAME_BYTES:
        raise ValueError(f"control frame of {length} bytes exceeds {MAX_FRAME_BYTES}")
    return decode_frame(recv_exact(sock, length))
