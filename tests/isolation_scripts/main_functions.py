"""Run as __main__: functions defined here travel to a child (spawned or forked by a zygote) by value.

Prints one JSON object with the results of a module-level function that uses a
module-level global and an imported module, a closure and a lambda.
"""

import json
import math
import os
import sys

from fedgpu.isolation import Isolator

SCALE = 3  # module-level global the function must take along


def hypot_scaled(a, b):
    return SCALE * math.hypot(a, b)


def make_adder(n):
    offset = n * 10

    def add(x):
        return x + offset + SCALE

    return add


def whoami():
    return os.getpid()


if __name__ == "__main__":
    add7 = make_adder(7)
    square = lambda x: x * x  # noqa: E731
    with Isolator(sys.argv[1] if len(sys.argv) > 1 else "spawn") as iso:
        results = {
            "hypot_scaled": iso.run(hypot_scaled, (3, 4)).value,
            "closure": iso.run(add7, (1,)).value,
            "lambda": iso.run(square, (12,)).value,
            "child": iso.run(whoami).value,
            "parent_pid": os.getpid(),
        }
    print("RESULT " + json.dumps(results))
