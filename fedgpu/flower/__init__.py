"""Flower integration: client nodes, server and apps; knows nothing of CUDA.

Importing this package never imports torch. ``isolate`` is the one wrapper a
Flower user needs to run their own ClientApp's work in short-lived children.
"""

from fedgpu.flower.isolate import isolate

__all__ = ["isolate"]
