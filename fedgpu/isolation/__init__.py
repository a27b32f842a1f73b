"""Isolation core: run a callable in a short-lived child; knows nothing of Flower.

>>> from fedgpu.isolation import Isolator
>>> with Isolator("spawn") as iso:
...     outcome = iso.run(sum, ([1, 2, 3],))
>>> outcome.value
6
"""

from fedgpu.isolation.core import MODES, Isolator, Outcome
from fedgpu.isolation.errors import ChildDied, ChildRaised, ChildTimedOut, IsolationError, RemoteTraceback

__all__ = [
    "MODES",
    "ChildDied",
    "ChildRaised",
    "ChildTimedOut",
    "IsolationError",
    "Isolator",
    "Outcome",
    "RemoteTraceback",
]
