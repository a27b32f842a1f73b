"""A legitimate zygote call while others hold connections open: idle, slow-drip, garbage.

The zygote serves every caller of a host from one thread. This measures what
a real call costs (median of N calls through ``Isolator("zygote")``) on a quiet
zygote and beside 50 idle connections plus one that drips its hello a byte at
a time, plus one of garbage, in one run. The goal: at most 0.2 s more.

``--zygote-module`` runs another implementation of the zygote (its server and
caller in one module, e.g. an older fedgpu's ``fedgpu/isolation/zygote.py``)
the same way, for a before/after comparison.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import median, report, table

IDLE = 50
GOAL_SECONDS = 0.2


def _zygote(directory: str, module_file: str | None) -> subprocess.Popen:
    target = [module_file] if module_file else ["-m", "fedgpu.isolation.zygote"]
    return subprocess.Popen([sys.executable, *target, "--dir", directory, "numpy"], stdin=subprocess.DEVNULL)


def _launcher(directory: str, module_file: str | None):
    from fedgpu.isolation import Isolator

    isolator = Isolator("zygote", zygote=directory)
    if module_file:  # the other implementation's caller side, in place of ours
        spec = importlib.util.spec_from_file_location("other_zygote", module_file)
        other = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(other)
        isolator._launcher = other.ZygoteLauncher(directory)
    return isolator


def _calls(isolator, count: int) -> list[float]:
    seconds = []
    for _ in range(count):
        started = time.perf_counter()
        try:
            isolator.run(os.getpid, timeout=60)
            seconds.append(time.perf_counter() - started)
        except Exception as err:  # noqa: BLE001 - a stalled zygote fails calls: count them as what they cost
            seconds.append(time.perf_counter() - started)
            print(f"call failed after {seconds[-1]:.1f} s: {err}", file=sys.stderr)
    return seconds


def measure(module_file: str | None, count: int) -> dict[str, list[float]]:
    directory = tempfile.mkdtemp(prefix="fedgpu-stall-")
    zygote = _zygote(directory, module_file)
    try:
        while not os.path.exists(os.path.join(directory, "ready")):
            if zygote.poll() is not None:
                raise SystemExit(f"the zygote exited with {zygote.returncode}")
            time.sleep(0.05)
        path = os.path.join(directory, "zygote.sock")
        isolator = _launcher(directory, module_file)
        quiet = _calls(isolator, count)
        idle = []
        for _ in range(IDLE):
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(path)
            idle.append(sock)
        garbage = socket.socket(socket.AF_UNIX)
        garbage.connect(path)
        garbage.sendall(os.urandom(4096))
        drip = socket.socket(socket.AF_UNIX)
        drip.connect(path)
        stop = threading.Event()

        def dripping() -> None:
            for byte in os.urandom(4096):
                if stop.wait(0.05):
                    return
                try:
                    drip.send(bytes([byte]))
                except OSError:
                    return

        threading.Thread(target=dripping, daemon=True).start()
        busy = _calls(isolator, count)
        stop.set()
        for sock in (*idle, garbage, drip):
            sock.close()
        isolator.shutdown()
        return {"quiet": quiet, "busy": busy}
    finally:
        zygote.terminate()
        zygote.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--zygote-module", default=None, help="another zygote implementation (one module) to measure")
    args = parser.parse_args()
    samples = measure(args.zygote_module, args.calls)
    quiet, busy = median(samples["quiet"]), median(samples["busy"])
    which = f"`{args.zygote_module}`" if args.zygote_module else "this fedgpu"
    body = table(
        ["zygote", "median call, quiet (s)", f"median call, {IDLE} idle + 1 drip + 1 garbage (s)", "added (s)", "goal"],
        [[which, quiet, busy, busy - quiet, f"<= {GOAL_SECONDS} s added"]],
    )
    name = "zygote_stall" if not args.zygote_module else "zygote_stall_other"
    report(name, "A zygote call beside idle, slow and garbage connections", body, samples)


if __name__ == "__main__":
    main()
