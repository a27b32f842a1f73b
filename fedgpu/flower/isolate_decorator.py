"""``@isolate``: run a Flower ClientApp function in a short-lived child.

    app = ClientApp()

    @app.train()
    @isolate()
    def train(msg: Message, context: Context) -> Message:
        import torch  # imported, and CUDA initialised, in the child only
        ...

The decorated function runs in a short-lived child per message, forked from a
warm zygote; its reply and its ``context.state`` come back through a pipe, and
the child's GPU memory is released when it exits. Works under any Flower
runtime (SuperNode, Simulation Engine); under ``fedgpu client --mp`` the whole
ClientApp is isolated already.

Import torch inside the decorated functions, never at the module's top: the
process that hosts the ClientApp (a Simulation Engine actor, a
``flwr-clientapp``) then never loads it, and stays light.

One zygote serves every decorated function of a process: the host's shared
one (``$FEDGPU_ZYGOTE``) or one private to the process, started at the first
call and warmed with every ``preload`` declared so far.
"""

from __future__ import annotations

import atexit
import functools
import importlib
import os
from collections.abc import Callable
from typing import Any

from flwr.app import Context, Message

from fedgpu.flower.transfer import TaskIds, adopt_task_identity, task_identity
from fedgpu.flower.warm_ups import TORCH_LAZY_MODULES
from fedgpu.isolation import Isolator
from fedgpu.names import IN_ISOLATED_CHILD

# Set in every child that runs ClientApp code (here and in `fedgpu client --mp`):
# there a decorated function runs directly instead of starting a nested child.
ClientAppFunction = Callable[[Message, Context], Message]


def _call_in_child(
    identity: TaskIds, module: str, qualname: str, message: Message, context: Context
) -> tuple[Message, Context]:
    adopt_task_identity(identity)
    target: Any = importlib.import_module(module)
    for part in qualname.split("."):
        target = getattr(target, part)
    # The module attribute is the wrapper; the child runs what it wraps.
    reply = getattr(target, "__wrapped__", target)(message, context)
    return reply, context


# One Isolator per process and mode, whatever number of functions are decorated.
_isolators: dict[str, Isolator] = {}
_preloads: list[str] = []  # every decorator's preload, for the one private zygote


def _isolator(mode: str) -> Isolator:
    if mode not in _isolators:
        _isolators[mode] = Isolator(mode, env={IN_ISOLATED_CHILD: "1"}, warm_ups=(*_preloads, TORCH_LAZY_MODULES))
        atexit.register(_isolators[mode].shutdown)
    return _isolators[mode]


def isolate(
    fn: ClientAppFunction | None = None,
    *,
    mode: str = "zygote",
    timeout: float | None = None,
    env: dict[str, str] | None = None,
    preload: tuple[str, ...] = (),
) -> Any:
    """Decorate a ``(msg, context) -> Message`` function to run in a child.

    ``mode``: ``zygote`` (default) forks each call from a warm zygote, the
    host's shared one (``$FEDGPU_ZYGOTE``) or the process's own, which first
    imports the decorated function's module and then (or calls) each
    ``preload`` entry: ``module``, ``module:function``; ``spawn`` starts a
    fresh interpreter per call; ``none`` runs it here.
    """

    def decorate(function: ClientAppFunction) -> ClientAppFunction:
        # Its own module, optionally ("?"): what a child would import first, and what it imports.
        modules = () if function.__module__ == "__main__" else (f"?{function.__module__}",)
        for entry in (*preload, *modules):
            if entry not in _preloads:
                _preloads.append(entry)

        @functools.wraps(function)
        def wrapper(message: Message, context: Context) -> Message:
            if os.environ.get(IN_ISOLATED_CHILD) == "1" or mode == "none":
                return function(message, context)
            if function.__module__ == "__main__":
                call: tuple[Any, ...] = (lambda m, c: (function(m, c), c), (message, context))
            else:
                call = (_call_in_child, (task_identity(), function.__module__, function.__qualname__, message, context))
            reply, child_context = _isolator(mode).run(*call, timeout=timeout, env=env).value
            context.state = child_context.state
            return reply

        return wrapper

    return decorate(fn) if fn is not None else decorate
