"""``fedgpu zygote``: become the zygote process (same pid, a fresh interpreter) that ``fedgpu.plans.zygote`` planned."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from fedgpu.isolation.zygote.warm import SINGLE_THREADED_ENV


@dataclass(frozen=True)
class ZygotePlan:
    """A checked ``fedgpu zygote`` (``fedgpu.plans.zygote``): its command line, and what its environment sets over
    ours."""

    argv: list[str]
    env: dict[str, str]


def exec_zygote(plan: ZygotePlan) -> None:
    """Become the zygote. This process has loaded flwr and numpy (and their thread pools) already: a fresh
    interpreter, same pid, its libraries single-threaded unless this environment says otherwise."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, plan.argv, {**SINGLE_THREADED_ENV, **os.environ, **plan.env})
