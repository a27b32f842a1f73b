"""Flower messages through the isolation core's socket.

A Flower ``Array`` keeps its weights as ``bytes`` plus caches of memoryviews
(not picklable); it travels here as its four fields with large data out of band.
Flower's per-process task identity does not travel by itself: the parent
reads it and the child adopts it (``fedgpu.flower.internals.identity``).
"""

from __future__ import annotations

import pickle
from typing import Any

from flwr.app import Array

from fedgpu.flower.internals.identity import TaskIds, adopt_task_identity, task_identity
from fedgpu.isolation import wire

__all__ = ["TaskIds", "adopt_task_identity", "task_identity"]  # re-exported: where a child's call is prepared


def _rebuild_array(dtype: str, shape: tuple[int, ...], stype: str, data: Any) -> Array:
    return Array(dtype=dtype, shape=tuple(shape), stype=stype, data=bytes(data))


def _reduce_array(array: Array) -> tuple[Any, ...]:
    data: Any = array.data
    if len(data) >= wire.OUT_OF_BAND_MIN_BYTES:
        data = pickle.PickleBuffer(data)
    return _rebuild_array, (array.dtype, tuple(array.shape), array.stype, data)


wire.register_reducer(Array, _reduce_array)
