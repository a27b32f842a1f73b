"""Entry point of a spawned child: ``python -m fedgpu.isolation.child FD PARENT_PID``.

The child is the leader of its own session and process group (so the parent can
stop it with everything it started), dies with its parent, receives one call
through the socket, answers once and exits. A child forked by the zygote goes
through the same ``become_call_child`` before serving its call.
"""

from __future__ import annotations

import os
import signal
import socket
import sys

_parent_pid = -1


def _on_sigterm(signum: int, _frame: object) -> None:
    # The parent is gone (parent-death signal): nobody will stop our group
    # for us, so take the grandchildren down now.
    if os.getppid() != _parent_pid:
        os.killpg(0, signal.SIGKILL)
    # Die of the signal itself, so the parent reports "killed by SIGTERM" and
    # not an exception raised inside the user's function.
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def become_call_child(parent_pid: int) -> None:
    """TERM kills us (and our group when orphaned); so does our parent's death.

    As a child subreaper we inherit whatever our call's processes leave
    behind, sessions of their own included, so that the call's end can stop it.
    """
    global _parent_pid
    from fedgpu.isolation.procs import die_with_parent, set_child_subreaper

    _parent_pid = parent_pid
    signal.signal(signal.SIGTERM, _on_sigterm)
    die_with_parent(parent_pid, signal.SIGTERM)
    set_child_subreaper()


def main(argv: list[str]) -> None:
    fd, parent_pid = int(argv[1]), int(argv[2])
    become_call_child(parent_pid)
    sock = socket.socket(fileno=fd)
    from fedgpu.isolation.serve import serve_one_call

    serve_one_call(sock)


if __name__ == "__main__":
    main(sys.argv)
