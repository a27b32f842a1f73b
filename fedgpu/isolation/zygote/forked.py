"""What runs in a fork of the zygote: leave the zygote behind, become a call's child, serve the call.

A fork holds a copy of every descriptor of the zygote; it closes them first
(a control connection kept open here would hide the zygote's death from its
caller), takes its own session, and never returns into the serving loop.
A spare is such a fork made ahead of its call: it runs the primers, then
waits on its channel for the call.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import traceback
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fedgpu.isolation.zygote.protocol import FDS_MARK, recv_frame
from fedgpu.isolation.zygote.warm import call_warm_up, reseed

if TYPE_CHECKING:
    from fedgpu.isolation.zygote.server import ZygoteServer


def fork() -> int:
    """``os.fork`` with our buffered output flushed first (or the child would print it again)."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    return os.fork()


def become_spare(server: ZygoteServer, channel: socket.socket) -> None:
    """In a fork made ahead of its call: run the primers, wait for the call, serve it."""
    try:
        leave_zygote(server)
        for spec in server.primers:
            call_warm_up(spec)
        data, fds, _, _ = socket.recv_fds(channel, 1, 3)  # until a call arrives
        if data != FDS_MARK or len(fds) != 3:
            os._exit(0)  # the zygote closed the channel: it is going away
        request = recv_frame(channel)
        channel.close()
    except BaseException:  # noqa: BLE001 - never return into the zygote's loop
        traceback.print_exc()
        os._exit(70)
    become_child(server, request, None, *fds)


def leave_zygote(server: ZygoteServer) -> None:
    """In a freshly forked process: become a call child of the zygote."""
    os.setsid()  # own session and group: stoppable with all it starts
    # Hold no zygote descriptor: a control connection kept open here
    # would hide the zygote's death from its caller.
    server.selector.close()
    server.listener.close()
    for pending in server.pending.values():
        pending.close()
    for conn, pidfd in server.children.values():
        conn.close()
        if pidfd is not None:
            os.close(pidfd)
    for pidfd in server.orphans.values():
        if pidfd is not None:
            os.close(pidfd)
    for _, channel, pidfd in server.spares:
        channel.close()
        if pidfd is not None:
            os.close(pidfd)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from fedgpu.isolation.child import become_call_child

    become_call_child(server.pid)


def become_child(
    server: ZygoteServer, request: Mapping[str, Any], conn: socket.socket | None, data_fd: int, out_fd: int, err_fd: int
) -> None:
    """Serve one call in this forked process (fresh from the zygote, or a spare)."""
    code = 70
    try:
        if conn is not None:  # fresh from the zygote (a spare has done this already)
            conn.close()
            leave_zygote(server)
        os.dup2(out_fd, 1)  # the caller's log, not the zygote's
        os.dup2(err_fd, 2)
        os.close(out_fd)
        os.close(err_fd)
        try:
            os.chdir(request["cwd"])
        except OSError:
            pass
        os.environ.clear()
        os.environ.update(request["env"])
        reseed()
        from fedgpu.isolation.serve import serve_one_call

        serve_one_call(socket.socket(fileno=data_fd))  # exits the process
    except BaseException:  # noqa: BLE001 - never return into the zygote's loop
        traceback.print_exc()
    finally:
        os._exit(code)
