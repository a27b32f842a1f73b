"""Flower messages through the isolation core's socket.

A Flower ``Array`` keeps its weights as ``bytes`` plus caches of memoryviews
(not picklable); it travels here as its four fields with large data out of band.
Flower's per-process ``TaskIdentity`` does not travel by itself: the parent
reads it and the child adopts it.
"""

from __future__ import annotations

import pickle
from typing import Any

from flwr.app import Array
from flwr.supercore.task_identity import TaskIdentity

from fedgpu.isolation import wire


def _rebuild_array(dtype: str, shape: tuple[int, ...], stype: str, data: Any) -> Array:
    return Array(dtype=dtype, shape=tuple(shape), stype=stype, data=bytes(data))


def _reduce_array(array: Array) -> tuple[Any, ...]:
    data: Any = array.data
    if len(data) >= wire.OUT_OF_BAND_MIN_BYTES:
        data = pickle.PickleBuffer(data)
    return _rebuild_array, (array.dtype, tuple(array.shape), array.stype, data)


wire.register_reducer(Array, _reduce_array)


TaskIds = tuple[int | None, int | None, int | None]


def task_identity() -> TaskIds:
    """(task id, run id, node id) of the task this process runs; None where unset."""
    return TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id


def adopt_task_identity(identity: TaskIds) -> None:
    """Make a child's Flower calls see the parent's task identity."""
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = identity
