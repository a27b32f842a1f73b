"""Calls a shared zygote from its own working directory and stdout.

usage: python zygote_caller.py ZYGOTE_DIR
Prints "RESULT <json>" with what the child saw; the child prints a line itself.
"""

import json
import os
import sys

from fedgpu.isolation import Isolator


def look_around() -> dict:
    print("HELLO FROM THE CHILD", flush=True)
    return {"var": os.environ.get("FEDGPU_TEST_VAR"), "cwd": os.getcwd(), "pid": os.getpid()}


if __name__ == "__main__":
    with Isolator("zygote", zygote=sys.argv[1], env={"FEDGPU_TEST_VAR": "from-the-caller"}) as iso:
        seen = iso.run(look_around, timeout=30).value
    print("RESULT " + json.dumps(seen), flush=True)
