"""A federation's shape, ``CLIENTS [MIN [SAMPLED [ROUNDS]]]``, read as ``fedgpu run`` and ``./run.sh`` take it.

Standard library only: ``python3 -m fedgpu.slurm`` reads the same numbers, with the
same messages, before any environment exists.
"""

from __future__ import annotations

from typing import Any

from fedgpu.errors import BadInput

DEFAULT_NODES = 10
MAX_COUNT = 999_999
SHAPE = (("clients", "nodes"), ("min", "min_clients"), ("sampled", "sampled"), ("rounds", "rounds"))


def read_positional(values: dict[str, Any], given: set[str], *, numbers_only: bool) -> None:
    """``[APP_DIR | CLIENTS [MIN [SAMPLED [ROUNDS]]]]`` into the options they stand for.

    Numbers are read as text (no wrap-around, no silent default). Under run.sh
    (``numbers_only``) every positional is a number: an app comes with --app.
    """
    positional = list(values.pop("positional", ()))
    if positional and not numbers_only and not values.get("app_dir") and not positional[0].isdigit():
        values["app_dir"] = positional.pop(0)
        given.add("app_dir")
    if len(positional) > len(SHAPE):
        raise BadInput("too many arguments: expected at most <clients> <min> <sampled> <rounds>, "
                       f"got {' '.join(positional)}")
    if values.get("app_dir") and len(positional) > 1:
        raise BadInput("with an app give only <clients>: the app's own config decides sampling and rounds "
                       "(change it with --run-config)")
    for text, (name, option) in zip(positional, SHAPE):
        if option in given:
            raise BadInput(f"{name} given twice: as a number and as --{option.replace('_', '-')}")
        if not text.isdigit() or int(text) < 1:
            raise BadInput(f"{name} must be a whole number >= 1, got {text!r}")
        if len(text.lstrip("0")) > len(str(MAX_COUNT)) or int(text) > MAX_COUNT:
            raise BadInput(f"{name} must be at most {MAX_COUNT}, got {text!r}")
        values[option] = int(text)
        given.add(option)
    if not values.get("app_dir"):  # run.sh's defaults: 10 10 5 3, and min and sampled within clients
        nodes = values["nodes"] or DEFAULT_NODES
        for name, option in SHAPE[1:3]:
            if values[option] is not None and values[option] > nodes:
                raise BadInput(f"{name} ({values[option]}) must not exceed clients ({nodes})")
