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
    """Become the zygote: a fresh interpreter, same pid, whose libraries start single-threaded unless this
    environment says otherwise (this process has parsed options and may have loaded what a plan needed)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, plan.argv, {**SINGLE_THREADED_ENV, **os.environ, **plan.env})
