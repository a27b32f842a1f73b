"""Flower's per-process task identity, read in a parent and adopted in its child (flwr 1.42).

Flower keeps which task a process runs in private class attributes of
``TaskIdentity``; they do not travel with a message, so the parent reads them
and the child sets them before it runs the ClientApp.
"""

from __future__ import annotations

from flwr.supercore.task_identity import TaskIdentity

TaskIds = tuple[int | None, int | None, int | None]


def task_identity() -> TaskIds:
    """(task id, run id, node id) of the task this process runs; None where unset."""
    return TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id


def adopt_task_identity(identity: TaskIds) -> None:
    """Make a child's Flower calls see the parent's task identity."""
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = identity
