"""What a checked ``fedgpu server`` is: where its SuperLink listens, how it is secured, which run it submits.

``fedgpu.plans.server`` checks the options into a :class:`ServerPlan`;
``fedgpu.flower.superlink`` and ``fedgpu.flower.server`` carry it out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedgpu.flower.settings import RunSettings


@dataclass(frozen=True)
class TlsFiles:
    """The SuperLink's TLS: the CA that signed its certificate, the certificate, its key."""

    ca_cert: str
    cert: str
    key: str


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 9092
    ready_timeout: float = 60.0
    tls: TlsFiles | None = None  # None: insecure (loopback and trusted networks only)
    auth_public_keys: tuple[str, ...] = ()  # SuperNode public keys: only these nodes may join (needs TLS)

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"


@dataclass(frozen=True)
class SimulationSettings:
    """``--simulation``: virtual nodes in one simulation host, each message in a child (fedgpu.flower.simulation)."""

    nodes: int
    workers: int
    isolation: str = "zygote"
    timeout: float | None = None  # a message's child at most (--timeout)
    node_config: str = ""  # more node config for every virtual node


@dataclass(frozen=True)
class ServerPlan:
    """A checked ``fedgpu server``: what to submit, where, how."""

    run_dir: Path
    server: ServerSettings
    run: RunSettings | None = None  # one of fedgpu's tasks, with our ServerApp
    app_dir: Path | None = None  # else the user's Flower app
    app: dict[str, Any] = field(default_factory=dict)  # its name, version, components
    run_config: tuple[str, ...] = ()  # --run-config overrides for the user's app
    wait_nodes: int = 0  # submit the run once this many client nodes are registered (0: at once)
    start_timeout: float = 300.0  # seconds to wait for them (and, in a user's ServerApp, for more)
    run_timeout: float | None = None  # seconds the submitted run may take; None: no limit
    simulation: SimulationSettings | None = None  # virtual nodes in a simulation host instead of a SuperLink
