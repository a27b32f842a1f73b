"""A process tree for ``stop_tree``: a parent, a child whose SIGTERM handler needs the parent, and a zombie.

Run as ``tree_needs_parent.py RESULT_FILE``. The child, on SIGTERM, says
"bye" to the parent and waits for its "ack" (as Flower's ServerApp reports to
its SuperLink as it exits), then writes "clean" to RESULT_FILE, or "parent gone"
when the parent is already dead. The parent never reaps a child that has
exited, so a zombie sits in the tree. "ready" on stdout once all that holds.
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

CHILD = """
import signal, socket, sys, time
sock = socket.socket(fileno=int(sys.argv[2]))
def bye(_signum, _frame):
    try:
        sock.sendall(b"bye")
        ok = sock.recv(3) == b"ack"
    except OSError:
        ok = False
    with open(sys.argv[1], "w") as result:
        result.write("clean" if ok else "parent gone")
    sys.exit(0)
signal.signal(signal.SIGTERM, bye)
sock.sendall(b"up")
while True:
    time.sleep(0.1)
"""

here, there = socket.socketpair()
zombie = subprocess.Popen([sys.executable, "-c", "pass"])  # kept, never waited for
child = subprocess.Popen([sys.executable, "-c", CHILD, sys.argv[1], str(there.fileno())], pass_fds=[there.fileno()])
assert here.recv(2) == b"up"
while Path(f"/proc/{zombie.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
    time.sleep(0.01)
print("ready", os.getpid(), flush=True)
while said := here.recv(3):  # until the child has gone
    if said == b"bye":
        here.sendall(b"ack")
while True:
    time.sleep(0.1)
