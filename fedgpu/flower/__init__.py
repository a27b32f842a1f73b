"""Flower integration: client nodes, server and apps; knows nothing of CUDA.

Importing this package never imports torch. ``isolate`` is the one wrapper a
Flower user needs to run their own ClientApp's work in short-lived children;
``CheckedStrategy`` wraps their strategy so that a bad reply costs one message.
"""

from typing import Any

__all__ = ["CheckedStrategy", "isolate"]


def __getattr__(name: str) -> Any:
    # Imported on first use: a client node never loads the server's strategies, and the launcher's light
    # modules (settings, config) never load Flower.
    if name == "isolate":
        from fedgpu.flower.isolate_decorator import isolate

        return isolate
    if name == "CheckedStrategy":
        from fedgpu.flower.checks import CheckedStrategy

        return CheckedStrategy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
