"""The zygote: one warm process per host that forks each call's child.

``protocol`` is what both sides agree on (files, trust checks, handshake,
frames), ``server`` is the zygote process, ``caller`` the Isolator's side.
Run one with ``python -m fedgpu.isolation.zygote --dir DIR [warm-ups...]``.
"""

from fedgpu.isolation.zygote.caller import ZygoteChild, ZygoteLauncher, connect, read_key
from fedgpu.isolation.zygote.protocol import (
    KEY_NAME,
    READY_NAME,
    SOCKET_NAME,
    ZygoteError,
    ZygoteUntrusted,
)

__all__ = [
    "KEY_NAME",
    "READY_NAME",
    "SOCKET_NAME",
    "ZygoteChild",
    "ZygoteError",
    "ZygoteLauncher",
    "ZygoteUntrusted",
    "connect",
    "read_key",
]
