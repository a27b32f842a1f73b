"""Only the owner's processes reach a run's HTTP servers.

A TCP connection carries no credentials, but both ends of a connection made on
this host are in this host's socket table, and the kernel records there which
uid created each socket::

    client (uid U) --TCP--> server, peer = (client addr, client port)
                                |
                                v
          sock_diag: the socket whose local end is the peer and whose remote
          end is the server's own end -> uid U (or no such socket: another host)

``OwnerOnly`` wraps an ASGI app (Flower's SuperLink and SuperNode are FastAPI
apps) and answers 403 to every request from a local socket of another uid, and
to requests from other hosts except on the paths it is told are for them (the
Fleet API, which TLS and SuperNode authentication protect). It looks up every
request, not every connection: a closed connection's port may be reused by
anyone, so a verdict is never cached. Linux only, like the rest of fedgpu.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import socket
import struct
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

# Every answer of a guarded server carries this header: a probe knows it reached
# its own run's server, not another run's on the same port.
RUN_TOKEN_HEADER = b"x-fedgpu-run"

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
# sock_diag(7): one exact lookup by the connection's four addresses, ~20 us
# (reading /proc/net/tcp walks the whole table: milliseconds per request).
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 1
_NLMSG_ERROR = 2
_NO_COOKIE = 0xFFFFFFFF
_NLMSG_HEADER = struct.Struct("=IHHII")
_DIAG_MSG_UID_OFFSET = _NLMSG_HEADER.size + 4 + 48 + 12  # inet_diag_msg: 4 bytes, sockid, expires, rqueue, wqueue


def _query(family: int, src: ipaddress._BaseAddress, sport: int, dst: ipaddress._BaseAddress, dport: int) -> int | None:
    """The uid of the TCP socket whose local end is src:sport and remote end dst:dport; None if there is none."""

    def field(address: ipaddress._BaseAddress) -> bytes:
        return address.packed.ljust(16, b"\0")

    sockid = struct.pack("!HH", sport, dport) + field(src) + field(dst) + struct.pack("=III", 0, _NO_COOKIE, _NO_COOKIE)
    request = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF) + sockid
    header = _NLMSG_HEADER.pack(_NLMSG_HEADER.size + len(request), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, 1, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as diag:
        diag.sendto(header + request, (0, 0))
        answer = diag.recv(65536)
    _, kind = struct.unpack_from("=IH", answer)
    if kind == _NLMSG_ERROR:
        (code,) = struct.unpack_from("=i", answer, _NLMSG_HEADER.size)
        if code == -errno.ENOENT:
            return None
        raise OSError(-code, os.strerror(-code))
    (uid,) = struct.unpack_from("=I", answer, _DIAG_MSG_UID_OFFSET)
    return uid


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(host.split("%")[0])


def tcp_peer_uid(peer: tuple[str, int], local: tuple[str, int]) -> int | None:
    """The uid that owns the socket at the other end of a TCP connection; None if it is not on this host.

    ``peer``: the connection's remote (host, port) as the server sees it;
    ``local``: the server's own end of that connection. OSError if the kernel
    cannot be asked (no sock_diag).
    """
    src, dst = _address(peer[0]), _address(local[0])
    mapped = [getattr(address, "ipv4_mapped", None) for address in (src, dst)]
    if all(mapped):  # an IPv4 client of a dual-stack server: its own socket is IPv4
        uid = _query(socket.AF_INET, mapped[0], int(peer[1]), mapped[1], int(local[1]))
        if uid is not None:
            return uid
    family = socket.AF_INET if src.version == 4 else socket.AF_INET6
    return _query(family, src, int(peer[1]), dst, int(local[1]))


def peer_lookup_problem() -> str:
    """"" if this kernel tells who owns a local TCP socket (sock_diag); else why not.

    Without it every request would be refused: a guarded server checks this first.
    """
    try:
        with socket.create_server(("127.0.0.1", 0)) as server, socket.create_connection(server.getsockname()):
            accepted, peer = server.accept()
            with accepted:
                uid = tcp_peer_uid(peer, accepted.getsockname())
    except OSError as err:
        return f"the kernel does not answer sock_diag queries ({err.strerror or err})"
    return "" if uid == os.geteuid() else f"sock_diag placed our own socket at uid {uid}"


def refusal(scope: Scope, remote_paths: tuple[str, ...], owner: int) -> str:
    """Why this request must be refused; "" to let it through."""
    client, server = scope.get("client"), scope.get("server")
    if not client or not server:
        return "no peer address"  # a Unix socket or a test client: nothing to vouch for it
    try:
        uid = tcp_peer_uid((str(client[0]), int(client[1])), (str(server[0]), int(server[1])))
    except (ValueError, OSError) as err:
        return f"cannot tell who is calling: {err}"
    path = str(scope.get("path", ""))
    if uid is None:  # another host: only what is meant for other hosts
        if any(path == prefix or path.startswith(prefix) for prefix in remote_paths):
            return ""
        return "this API answers only its owner's processes on its own host"
    if uid != owner:
        return "this server answers only its owner's processes"
    return ""


class OwnerOnly:
    """ASGI middleware: 403 for every request that is not from the owner's processes.

    Parameters
    ----------
    app : ASGI application
        The server to guard.
    remote_paths : tuple of str, default ()
        Path prefixes other hosts may use (a SuperLink's Fleet API); nothing else
        answers them.
    owner : int, optional
        The uid whose local processes are served; default: this process's.
    token : str, optional
        Sent back in the ``x-fedgpu-run`` header of every answer to the owner.
    """

    def __init__(self, app: Callable[..., Awaitable[None]], remote_paths: tuple[str, ...] = (),
                 owner: int | None = None, token: str | None = None) -> None:
        self.app = app
        self.remote_paths = remote_paths
        self.owner = os.geteuid() if owner is None else owner
        self.token = token.encode() if token else None
        self.refused = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        why = refusal(scope, self.remote_paths, self.owner)
        if why:
            self.refused += 1
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            body = json.dumps({"detail": why}).encode()
            await send({"type": "http.response.start", "status": 403,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        if self.token is None:
            await self.app(scope, receive, send)
            return

        async def send_with_token(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (RUN_TOKEN_HEADER, self.token)]}
            await send(message)

        await self.app(scope, receive, send_with_token)
