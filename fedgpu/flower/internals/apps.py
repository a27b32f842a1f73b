"""Loading a ClientApp the way Flower's runtimes do, inside a message's child (flwr 1.42)."""

from __future__ import annotations

from typing import Any


def load_client_app(reference: str, app_dir: str) -> Any:
    """The ClientApp ``module:attribute`` of the app in ``app_dir`` (inside a child: a warm module is not re-imported)."""
    from flwr.clientapp.client_app import LoadClientAppError
    from flwr.supercore.object_ref import load_app

    return load_app(reference, LoadClientAppError, app_dir)
