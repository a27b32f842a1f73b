"""A parent that runs a long call in an isolated child, to be SIGKILLed by the test.

usage: python parent_dies.py PIDFILE
The child writes "CHILD_PID GRANDCHILD_PID" to PIDFILE, then sleeps.
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
    with Isolator("spawn", grace=0.5) as iso:
        iso.run(long_call, (sys.argv[1],))
