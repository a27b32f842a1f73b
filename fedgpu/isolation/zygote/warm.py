"""What makes a process fit to be a zygote, and its forks fit to be children.

The zygote imports and calls its warm-ups (``call_warm_up``), and is refused
if it initialised CUDA or runs a thread (``assert_fork_safe``): a fork carries
neither into the child. Libraries that start helper threads are kept
single-threaded by environment (``SINGLE_THREADED_ENV``); each child reseeds
the global random generators it inherited (``reseed``).
"""

from __future__ import annotations

import importlib
import os
import resource
import sys
import threading

from fedgpu.isolation.zygote.protocol import (
    ZygoteError,
)

MAX_DESCRIPTORS = 65536  # the soft RLIMIT_NOFILE the zygote raises itself to (at most its hard limit)

# Libraries whose helper threads a fork would not carry into the child are
# kept single-threaded in the zygote; children set their own torch threads.
SINGLE_THREADED_ENV = {
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "JE_ARROW_MALLOC_CONF": "background_thread:false",  # pyarrow's jemalloc
}


def call_warm_up(spec: str) -> bool:
    """Import ``module`` or call ``module:function`` / ``module:function=ARG``; whether it was done.

    ``?spec``: the same, but a failure is only reported (and False returned): a warm-up
    that would be nice to have must not cost the zygote (its children import it themselves).
    """
    if spec.startswith("?"):
        try:
            return call_warm_up(spec[1:])
        except Exception as err:  # noqa: BLE001 - optional by request
            print(f"[fedgpu] zygote: optional warm-up {spec[1:]} failed, skipped: {err!r}", file=sys.stderr, flush=True)
        return False
    ref, _, arg = spec.partition("=")
    module_name, _, function_name = ref.partition(":")
    module = importlib.import_module(module_name)
    if function_name:
        function = getattr(module, function_name)
        function(arg) if arg else function()
    return True


def native_threads() -> list[str]:
    """Names of this process's threads (the main thread included)."""
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as comm:
                names.append(comm.read().strip())
        except OSError:
            pass
    return names


def assert_fork_safe() -> None:
    """Refuse to serve from a process that initialised CUDA or runs threads."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        raise ZygoteError("CUDA was initialised in the zygote; its forked children could not use the GPU")
    if threading.active_count() != 1:
        raise ZygoteError(f"the zygote must be single-threaded before forking, found {threading.enumerate()}")
    threads = native_threads()
    if len(threads) != 1:
        raise ZygoteError(f"the zygote must be single-threaded before forking; native threads: {threads}")


def reseed() -> None:
    """Fresh random state per child, as a spawned one would have.

    ``random`` reseeds itself after fork; NumPy's and torch's global generators
    would otherwise repeat the zygote's stream in every child.
    """
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.seed()  # CUDA generators are seeded lazily: this starts no CUDA


def raise_descriptor_limit() -> None:
    """Raise the soft RLIMIT_NOFILE towards the hard one, to MAX_DESCRIPTORS at most.

    Each caller holds a connection while its child runs, and handshakes wait
    beside them (a flood of idle ones too): do not run out at 1024. Bounded,
    as the children inherit it and some programs walk every possible descriptor.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = MAX_DESCRIPTORS if hard == resource.RLIM_INFINITY else min(hard, MAX_DESCRIPTORS)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError):
            pass
