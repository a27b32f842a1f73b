"""``python -m fedgpu.flower.internals superlink|flwr [--parent-pid PID] ARGS``: Flower's CLIs with fedgpu's changes.

``superlink``: Flower's SuperLink, guarded and paced; ``flwr``: Flower's own
``flwr`` CLI. Either dies with the process ``--parent-pid`` names.
"""

import sys

from fedgpu.flower.internals.processes import flwr_entry, superlink_entry

ENTRIES = {"superlink": superlink_entry, "flwr": flwr_entry}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ENTRIES:
        sys.exit(f"usage: python -m fedgpu.flower.internals {{{'|'.join(ENTRIES)}}} [--parent-pid PID] ARGS")
    ENTRIES[sys.argv[1]](sys.argv[2:])
