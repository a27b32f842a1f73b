"""``python -m fedgpu.flower.internals superlink ARGS``: Flower's SuperLink, guarded and paced."""

import sys

from fedgpu.flower.internals import superlink_main

if __name__ == "__main__":
    superlink_main(sys.argv[2:])
