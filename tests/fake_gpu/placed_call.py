"""One client node of the admission test: a call in a spawned child, placed through the host's ledger.

    python placed_call.py CLIENT MIB SECONDS

The child holds MIB on its GPU (fake_cuda) for SECONDS. Prints the outcome as JSON.
"""

from __future__ import annotations

import json
import sys

from fedgpu.flower.children import run_child
from fedgpu.isolation import Isolator
from fedgpu.nvml.placement import GpuPlacer, PlacementSettings


def hold(mib: int, seconds: float) -> int:
    import time

    import fake_cuda

    gpu = fake_cuda.allocate(mib)
    time.sleep(seconds)
    return gpu


if __name__ == "__main__":
    client, mib, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    placer = GpuPlacer.from_settings(PlacementSettings.from_env())
    assert placer is not None, "the fake NVML must be in use"
    with Isolator("spawn") as isolator:
        who = {"client": client, "round": 1, "message": "train"}
        outcome, placement = run_child(isolator, placer, hold, (mib, seconds), key="fake/train", who=who, role="client-child")
    assert placement is not None
    print(json.dumps({"gpu": outcome.value, "placed_on": placement.gpu, "waited": placement.waited_seconds,
                      "peak_mib": outcome.gpu_peak_bytes / 2**20}))
