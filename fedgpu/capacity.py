"""Will this host hold N client nodes? An estimate from measured figures, against MemAvailable.

``too_many`` says in one line why the host cannot hold the federation when the
estimate exceeds the memory it has available; ``fedgpu run`` checks it before it
starts anything (``--force`` skips it).
"""

from __future__ import annotations

# Measured on a 2-core, 24 GiB host (benchmarks/idle_memory.py, at_rest.py, README):
NODE_MIB = 135  # an idle client node with --mp: Flower's SuperNode and our runner, never torch
NODE_IN_PROCESS_MIB = 810  # a node that trained in its own process keeps torch and its data
ZYGOTE_MIB = 1000  # the warm zygote: torch, the task, the data stack
SERVER_MIB = 700  # SuperLink, SuperExec, ServerApp and its evaluation child
CHILD_MIB = 300  # what a message's child adds of its own while it trains (pages it writes)


def estimate_mib(clients: int, sampled: int, mp: bool = True) -> float:
    if not mp:
        return clients * NODE_IN_PROCESS_MIB + SERVER_MIB
    return clients * NODE_MIB + ZYGOTE_MIB + SERVER_MIB + sampled * CHILD_MIB


def available_mib() -> float | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def too_many(clients: int, sampled: int, mp: bool = True) -> str | None:
    """One line saying why this host cannot hold the federation, or None if it can (or cannot tell)."""
    available = available_mib()
    need = estimate_mib(clients, sampled, mp)
    if available is None or need <= available:
        return None
    each = (f"{NODE_MIB} MiB per node, {ZYGOTE_MIB} MiB for the zygote" if mp
            else f"{NODE_IN_PROCESS_MIB} MiB per node that trains in its own process")
    return (
        f"{clients} client nodes need about {need / 1024:.1f} GiB ({each}, {SERVER_MIB} MiB for the server), "
        f"but this host has {available / 1024:.1f} GiB available; start fewer, or give --force to try anyway"
    )
