"""Readiness by probing: wait until a Flower server's /health answers 200."""

from __future__ import annotations

import time
import urllib.request
from typing import Callable


def wait_for_health(url: str, timeout: float | None = None, alive: Callable[[], bool] = lambda: True) -> bool:
    """True once ``url`` answers 200; False on timeout or once ``alive()`` is False."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while alive() and (deadline is None or time.monotonic() < deadline):
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    return False
