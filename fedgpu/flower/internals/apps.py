"""A ClientApp loaded the way Flower's runtimes do, and an app packaged as `flwr run` packages it (flwr 1.42)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# At import: the zygote warms fedgpu.flower.runner up, and with it these, for every child.
from flwr.cli.install import install_from_fab
from flwr.clientapp.utils import get_load_client_app_fn


def load_client_app(reference: str, app_dir: str) -> Any:
    """The ClientApp ``module:attribute`` of the app in ``app_dir`` (inside a child: a warm module is not
    re-imported)."""
    from flwr.clientapp.client_app import LoadClientAppError
    from flwr.supercore.object_ref import load_app

    return load_app(reference, LoadClientAppError, app_dir)


def build_fab(app_dir: str | os.PathLike) -> bytes:
    """The FAB (a zip) that ``flwr run APP_DIR`` builds and submits; the directory is only read.

    Flower's builder keeps what the nodes need (its include and exclude rules,
    the app's .gitignore) and leaves ``[tool.flwr.federations]`` out of the
    FAB's pyproject.toml, so `flwr run` on the unpacked FAB has nothing to
    migrate into the user's file. ValueError (or OSError) says why an app cannot
    be packaged: an invalid config, a path nested too deep, over 10 MB.
    """
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(Path(app_dir))


def install_fab(content: bytes) -> None:
    """Install a run's FAB into this process's Flower home, as ``flwr-clientapp`` does."""
    install_from_fab(content, skip_prompt=True)


def client_app_from_fab(fab_id: str, fab_version: str, fab_hash: str) -> Any:
    """The ClientApp of an installed FAB, loaded as ``flwr-clientapp`` loads it."""
    load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
    return load(fab_id, fab_version, fab_hash)
