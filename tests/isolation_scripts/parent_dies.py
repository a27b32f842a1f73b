"""A parent that runs a long call in an isolated child, to be SIGKILLed by the test.

usage: python parent_dies.py PIDFILE [MODE [ZYGOTE_DIR]]
The child writes "CHILD_PID GRANDCHILD_PID" to PIDFILE, then sleeps. MODE is
spawn (default) or zygote; without ZYGOTE_DIR a zygote is private to us.
"""

import sys

from fedgpu.isolation import Isolator


def long_call(pidfile: str) -> None:
    import os
    import subprocess
    import time

    grandchild = subprocess.Popen(["sleep", "300"])
    with open(pidfile + ".tmp", "w") as f:
        f.write(f"{os.getpid()} {grandchild.pid}")
    os.replace(pidfile + ".tmp", pidfile)
    time.sleep(300)


if __name__ == "__main__":
    mode = sys.argv[2] if len(sys.argv) > 2 else "spawn"
    zygote = sys.argv[3] if len(sys.argv) > 3 else None
    with Isolator(mode, grace=0.5, zygote=zygote) as iso:
        iso.run(long_call, (sys.argv[1],))
