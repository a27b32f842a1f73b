"""One client node of the admission test: a call in a spawned child, placed through the host's ledger.

    python placed_call.py CLIENT MIB SECONDS GROUP

The child meets GROUP children (fake_cuda.meet), then holds MIB on its GPU for
SECONDS. Prints the outcome as JSON.
"""

from __future__ import annotations

import json
import sys

from fedgpu.flower.children import run_child
from fedgpu.isolation import Isolator
from fedgpu.nvml.placement import GpuPlacer, PlacementSettings


def hold(mib: int, seconds: float, group: int) -> int:
    import time

    import fake_cuda

    fake_cuda.meet(group)
    gpu = fake_cuda.allocate(mib)
    time.sleep(seconds)
    return gpu


if __name__ == "__main__":
    client, mib, seconds, group = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
    placer = GpuPlacer.from_settings(PlacementSettings.from_env())
    assert placer is not None, "the fake NVML must be in use"
    with Isolator("spawn") as isolator:
        who = {"client": client, "round": 1, "message": "train"}
        outcome, placement = run_child(isolator, placer, hold, (mib, seconds, group), key="fake/train", who=who,
                                       role="client-child")
    assert placement is not None
    print(json.dumps({"gpu": outcome.value, "placed_on": placement.gpu, "waited": placement.waited_seconds,
                      "peak_mib": outcome.gpu_peak_bytes / 2**20}))
