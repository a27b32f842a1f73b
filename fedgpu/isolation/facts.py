"""Facts a child adds to its reply once its call is done, from hooks that upper layers register.

The core measures what every child has (its work time, its peak RSS); a layer
that knows more registers a function for it, as the Flower integration
registers its reducers with ``wire.register_reducer``, so the core never
imports that layer: GPU placement (``fedgpu.nvml.placement``) registers ``gpu_peak_bytes``.

The hooks registered in the parent travel with each call (by reference: the
child imports the module that defines them), so a child measures them
whatever it imported itself; hooks the child registered itself run too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

ChildFact = Callable[[], Any]

_hooks: dict[str, ChildFact] = {}


def register_child_fact(name: str, fn: ChildFact) -> None:
    """Have every child call ``fn()`` after its call and report the result as ``Outcome.facts[name]``.

    ``fn`` must be a module-level function (it is sent by reference) and
    cheap; an exception it raises leaves its fact out, never costs the call
    its result.
    """
    _hooks[name] = fn


def registered_facts() -> dict[str, ChildFact]:
    """The hooks registered in this process, by name."""
    return dict(_hooks)


def gather_facts(sent: Mapping[str, ChildFact]) -> dict[str, Any]:
    """Call every hook, those ``sent`` with the call and this process's own; their results by name."""
    facts: dict[str, Any] = {}
    for name, fn in {**_hooks, **sent}.items():
        try:
            facts[name] = fn()
        except Exception:  # noqa: BLE001 - a fact that cannot be measured is left out
            pass
    return facts
