"""Who may reach the SuperLink and the SuperNodes fedgpu starts: owner-only apps, a port bound first (flwr 1.42)."""

from __future__ import annotations

import socket
import sys
from types import ModuleType

# What other hosts may ask of a run's SuperLink: the Fleet API (TLS and SuperNode
# authentication protect it) and the health probe. Control and ServerAppIo answer
# only the owner's processes on the SuperLink's own host.
FLEET_PATHS = ("/v1/fleet/", "/health")


def guard_app_factory(module: ModuleType, remote_paths: tuple[str, ...], token: str | None = None) -> None:
    """Every app ``module.create_app`` makes (Flower's SuperLink or SuperNode) answers only the owner.

    Fails closed: if Flower's factory is not what this expects, nothing is served.
    """
    from fedgpu.owner_only import OwnerOnly, peer_lookup_problem

    problem = peer_lookup_problem()
    if problem:
        raise RuntimeError(f"fedgpu cannot tell the owner's connections from others': {problem}; not serving")
    create_app = getattr(module, "create_app", None)
    if not callable(create_app):
        raise RuntimeError(f"{module.__name__}.create_app is gone: fedgpu cannot guard this Flower version's API")

    def guarded_create_app(*args, **kwargs):  # Flower's signature
        app = create_app(*args, **kwargs)
        app.add_middleware(OwnerOnly, remote_paths=remote_paths, token=token)  # outermost: before Flower's own
        return app

    module.create_app = guarded_create_app


def guard_supernode_runtime() -> None:
    """The Runtime API of a SuperNode in this process answers only the owner's processes on this host."""
    from flwr.supernode import main as supernode_main

    guard_app_factory(supernode_main, remote_paths=())


def bind_listener(host: str, port: int) -> socket.socket:
    """The SuperLink's listening socket, bound before Flower starts: a port taken is known at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT of an earlier run is no owner
    try:
        sock.bind((host.strip("[]"), port))
        # Listening at once: Linux lets two SO_REUSEADDR sockets bind one port until one listens.
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


class BoundUvicorn:
    """Stands in for ``uvicorn`` in Flower's SuperLink and SuperNode CLIs: they serve on the socket bound beforehand.

    The SuperLink CLI calls ``uvicorn.run(app, ...)``; the SuperNode CLI builds
    ``uvicorn.Server(uvicorn.Config(...))`` itself. Either way the port is ours
    from before Flower starts: a port picked free and bound later could be handed
    to another process in between.
    """

    def __init__(self, sock: socket.socket) -> None:
        import uvicorn

        self._sock = sock

        class Server(uvicorn.Server):
            def run(self, sockets: list[socket.socket] | None = None) -> None:
                super().run(sockets=[sock])

        self.Server = Server

    def run(self, app: object, **options: object) -> None:
        import uvicorn

        config = uvicorn.Config(app, **options)  # type: ignore[arg-type]
        config.load_app()
        host, port = self._sock.getsockname()[:2]
        scheme = "https" if options.get("ssl_certfile") else "http"
        # uvicorn says where it runs only for sockets it bound itself.
        print(f"[fedgpu] SuperLink listening on {scheme}://{host}:{port}", file=sys.stderr, flush=True)
        self.Server(config).run()

    def __getattr__(self, name: str) -> object:
        import uvicorn

        return getattr(uvicorn, name)
