"""The one base class of the errors fedgpu raises on purpose.

Errors cross process boundaries here (a child's failure reaches its node, a
node's reaches the server's report), so every one of them survives
``pickle.loads(pickle.dumps(error))`` with its message and its fields, whatever
its ``__init__`` takes: ``BaseException``'s own pickling would call ``__init__``
again with the message alone.
"""

from __future__ import annotations

from typing import Any


class FedgpuError(RuntimeError):
    """Something fedgpu could not do; ``str(error)`` says what, in one line where it can."""

    # Attributes not worth carrying to another process (e.g. live objects); None on the other side.
    _not_pickled: tuple[str, ...] = ()

    def __reduce__(self) -> tuple[Any, ...]:
        state = {name: (None if name in self._not_pickled else value) for name, value in self.__dict__.items()}
        return _restore, (type(self), self.args, state)


def _restore(cls: type[FedgpuError], args: tuple[Any, ...], state: dict[str, Any]) -> FedgpuError:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class BadInput(FedgpuError):
    """Input that cannot work: one line naming the problem; the command exits 2 before starting anything."""
