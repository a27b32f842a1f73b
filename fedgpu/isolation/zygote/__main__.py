"""``python -m fedgpu.isolation.zygote --dir DIR [--parent-pid PID] [warm-up ...]``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from fedgpu.isolation.zygote.protocol import ZygoteError
from fedgpu.isolation.zygote.start import serve
from fedgpu.isolation.zygote.warm import SINGLE_THREADED_ENV


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fedgpu.isolation.zygote",
                                     description="A warm zygote for fedgpu's children.")
    parser.add_argument("--dir", required=True, help="Private directory (0700, ours) for the socket and the key.")
    parser.add_argument("--parent-pid", type=int, default=None, help="Exit when this process (our parent) dies.")
    parser.add_argument("warm_ups", nargs="*", help="module, module:function or module:function=ARG, in order.")
    args = parser.parse_args(argv)
    for name, value in SINGLE_THREADED_ENV.items():
        os.environ.setdefault(name, value)  # before anything imports the libraries
    try:
        serve(args.dir, args.warm_ups, args.parent_pid)
    except ZygoteError as err:
        print(f"fedgpu zygote: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
