"""``python -m fedgpu.flower.internals superlink [--parent-pid PID] ARGS``: Flower's SuperLink with fedgpu's changes.

Guarded and paced; it dies with the process ``--parent-pid`` names.
"""

import sys

from fedgpu.flower.internals.processes import superlink_entry

ENTRIES = {"superlink": superlink_entry}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ENTRIES:
        sys.exit(f"usage: python -m fedgpu.flower.internals {{{'|'.join(ENTRIES)}}} [--parent-pid PID] ARGS")
    ENTRIES[sys.argv[1]](sys.argv[2:])
