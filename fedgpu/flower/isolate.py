"""``@isolate``: run a Flower ClientApp function in a short-lived child.

    app = ClientApp()

    @app.train()
    @isolate()
    def train(msg: Message, context: Context) -> Message:
        import torch  # imported, and CUDA initialised, in the child only
        ...

The decorated function runs in a fresh child per message; its reply and its
``context.state`` come back through a pipe, and the child's GPU memory is
released when it exits. Works under any Flower runtime (SuperNode, Simulation
Engine); under ``fedgpu client --mp`` the whole ClientApp is isolated already.
"""

from __future__ import annotations

import atexit
import functools
import importlib
import os
from typing import Any, Callable

from flwr.app import Context, Message

from fedgpu.flower.transfer import TaskIds, adopt_task_identity, task_identity
from fedgpu.isolation import Isolator

# Set in every child that runs ClientApp code (here and in `fedgpu client --mp`):
# there a decorated function runs directly instead of starting a nested child.
IN_ISOLATED_CHILD = "FEDGPU_ISOLATED_CALL"
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


def isolate(
    fn: ClientAppFunction | None = None,
    *,
    mode: str = "spawn",
    timeout: float | None = None,
    env: dict[str, str] | None = None,
    preload: tuple[str, ...] = (),
) -> Any:
    """Decorate a ``(msg, context) -> Message`` function to run in a child.

    ``mode="zygote"`` forks each call from a warm zygote: the host's shared one
    (``$FEDGPU_ZYGOTE``) or one private to this process, which first imports
    (or calls) each ``preload`` entry: ``module``, ``module:function``.
    """

    def decorate(function: ClientAppFunction) -> ClientAppFunction:
        isolator: list[Isolator] = []

        @functools.wraps(function)
        def wrapper(message: Message, context: Context) -> Message:
            if os.environ.get(IN_ISOLATED_CHILD) == "1" or mode == "none":
                return function(message, context)
            if not isolator:
                isolator.append(Isolator(mode, env={**(env or {}), IN_ISOLATED_CHILD: "1"}, warm_ups=preload))
                atexit.register(isolator[0].shutdown)
            if function.__module__ == "__main__":
                call: tuple[Any, ...] = (lambda m, c: (function(m, c), c), (message, context))
            else:
                call = (_call_in_child, (task_identity(), function.__module__, function.__qualname__, message, context))
            reply, child_context = isolator[0].run(*call, timeout=timeout).value
            context.state = child_context.state
            return reply

        return wrapper

    return decorate(fn) if fn is not None else decorate
