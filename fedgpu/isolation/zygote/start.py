"""Starting a zygote: its private directory, its warm-ups, its key and ready file, then the serving loop.

``python -m fedgpu.isolation.zygote`` calls ``serve``; ``prepare_directory``
is also what a launcher checks before it starts one.
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import time
from collections.abc import Sequence

from fedgpu.isolation.procs import (
    die_with_parent,
    set_child_subreaper,
)
from fedgpu.isolation.unix_paths import unix_address
from fedgpu.isolation.zygote.protocol import (
    KEY_NAME,
    READY_NAME,
    SOCKET_NAME,
    ZygoteError,
    check_private_dir,
)
from fedgpu.isolation.zygote.server import ZygoteServer
from fedgpu.isolation.zygote.warm import assert_fork_safe, call_warm_up, raise_descriptor_limit
from fedgpu.names import ZYGOTE_SPARES_ENV

MAX_SPARES = 64  # each is a primed process: its private pages count


def prepare_directory(directory: str) -> None:
    """Create the zygote's directory (0700) or check it is ours and private.

    A socket left by a zygote that died (nobody listens) is removed with the
    dead zygote's key and ready file; a live zygote there is a refusal.
    """
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError as err:
        raise ZygoteError(f"cannot create {directory}: {err.strerror or err}") from None
    check_private_dir(directory)
    path = os.path.join(directory, SOCKET_NAME)
    if os.path.lexists(path):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(2.0)
            with unix_address(path) as address:
                probe.connect(address)
        except OSError:
            pass  # nobody listens: a dead zygote's socket
        else:
            raise ZygoteError(f"a zygote is already serving {directory} (pid {_ready_pid(directory) or 'unknown'})")
        finally:
            probe.close()
    for name in (READY_NAME, KEY_NAME, SOCKET_NAME):
        try:
            os.unlink(os.path.join(directory, name))
        except FileNotFoundError:
            pass


def _ready_pid(directory: str) -> int | None:
    try:
        with open(os.path.join(directory, READY_NAME)) as ready:
            return int(ready.read())
    except (OSError, ValueError):
        return None


def spares_wanted() -> int:
    """Spare children to keep primed: $FEDGPU_ZYGOTE_SPARES (a simulation sets its workers), else one."""
    try:
        return max(0, min(MAX_SPARES, int(os.environ.get(ZYGOTE_SPARES_ENV) or 1)))
    except ValueError:
        return 1


def _on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _write_private(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def serve(directory: str, warm_ups: Sequence[str], parent_pid: int | None) -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, _on_sigterm)
    if parent_pid is not None:
        die_with_parent(parent_pid, signal.SIGTERM)
    prepare_directory(directory)
    started = time.perf_counter()
    # What the ready line lists: the warm-ups done, by name (an optional one's "?" is no part of it).
    warmed = [spec.lstrip("?") for spec in warm_ups if call_warm_up(spec)]
    assert_fork_safe()
    # Every object alive now is shared with the children copy-on-write. A
    # collection in a child would write to each object's header and copy
    # nearly every page; frozen objects are never traversed.
    gc.collect()
    gc.freeze()
    set_child_subreaper()  # after the warm-ups: only what calls leave behind comes to us
    raise_descriptor_limit()
    key = os.urandom(32)
    _write_private(os.path.join(directory, KEY_NAME), key)
    primers = [spec for spec in warm_ups if ":" in spec.lstrip("?").partition("=")[0]]
    server = ZygoteServer(directory, key, primers=primers, spares=spares_wanted(),
                          unprimed_spares=bool(os.environ.get(ZYGOTE_SPARES_ENV)))
    try:
        ready = os.path.join(directory, READY_NAME)
        _write_private(ready + ".tmp", str(os.getpid()).encode())
        os.rename(ready + ".tmp", ready)  # callers never see a half-written file
        print(
            f"[fedgpu] zygote {os.getpid()} ready in {time.perf_counter() - started:.1f} s "
            f"at {directory} (warm-ups: {', '.join(warmed) or 'none'})",
            flush=True,
        )
        server.fork_spares()
        server.serve_forever()
    finally:
        server.close()
