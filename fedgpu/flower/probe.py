"""Readiness by probing: wait until a Flower server's /health answers 200."""

from __future__ import annotations

import ssl
import time
import urllib.request
from collections.abc import Callable

from fedgpu.owner_only import RUN_TOKEN_HEADER


def wait_for_health(
    url: str, timeout: float | None = None, alive: Callable[[], bool] = lambda: True, *, ca_file: str | None = None,
    token: str | None = None,
) -> bool:
    """True once ``url`` answers 200; False on timeout or once ``alive()`` is False.

    ``ca_file``: an https URL is verified against this CA (a SuperLink with TLS).
    ``token``: only an answer carrying this run token counts (another run's
    server on the same port is not ours)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    context = ssl.create_default_context(cafile=ca_file) if ca_file else None
    while alive() and (deadline is None or time.monotonic() < deadline):
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as response:
                if response.status == 200 and (token is None or response.headers.get(RUN_TOKEN_HEADER.decode()) == token):
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    return False
