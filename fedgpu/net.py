"""The network helpers every role shares: a free port, a port's availability, reachability, readiness.

All of it is plain TCP and HTTP on the standard library; nothing here knows
Flower, beyond the ``/health`` URL a caller passes in.
"""

from __future__ import annotations

import socket
import ssl
import time
import urllib.request
from collections.abc import Callable

from fedgpu.owner_only import RUN_TOKEN_HEADER


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the kernel's pick)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen on host:port now."""
    with socket.socket() as sock:
        # As servers do: connections of a previous run in TIME_WAIT do not count.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def reach_host(host: str) -> str:
    """Where to reach, from this host, a server that listens on ``host`` (0.0.0.0: 127.0.0.1)."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host in ("::", "[::]"):
        return "[::1]"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def is_host_port(address: str) -> bool:
    """Whether ``address`` reads as HOST:PORT (an IPv6 host as [::1]:PORT)."""
    host, _, port = address.rpartition(":")
    return bool(host) and port.isascii() and port.isdigit()


def unreachable(address: str, timeout: float = 2.0) -> str:
    """"" when a TCP connection to HOST:PORT opens, else why not."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
        return ""
    except OSError as err:
        return err.strerror or str(err)


def wait_for_health(
    url: str, timeout: float | None = None, alive: Callable[[], bool] = lambda: True, *, ca_file: str | None = None,
    token: str | None = None,
) -> bool:
    """True once ``url`` answers 200; False on timeout or once ``alive()`` is False.

    ``ca_file``: an https URL is verified against this CA (a SuperLink with TLS).
    ``token``: only an answer carrying this run token counts (another run's
    server on the same port is not ours)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    context = ssl.create_default_context(cafile=ca_file) if ca_file else None
    while alive() and (deadline is None or time.monotonic() < deadline):
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as response:
                ours = token is None or response.headers.get(RUN_TOKEN_HEADER.decode()) == token
                if response.status == 200 and ours:
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    return False
