"""Flower's config syntax as fedgpu reads and writes it: run and node config pairs, TOML values, task options."""

from __future__ import annotations

import json
from typing import Any


def toml_value(value: object) -> str:
    """A value as TOML, as Flower reads run and node config."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def parse_config_pairs(text: str) -> dict[str, object]:
    """Flower's config syntax (``--node-config``, ``--run-config``), strictly: space-separated
    key=value, values TOML (bool, int, float, "string"). Flower's own parser drops what it cannot read."""
    import re

    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    pair = re.compile(r"""\s*([A-Za-z_][A-Za-z0-9_.-]*)=("(?:[^"\\]|\\.)*"|'[^']*'|[^\s"']+)(?=\s|$)""")
    config: dict[str, object] = {}
    position, text = 0, text.strip()
    while position < len(text):
        match = pair.match(text, position)
        if match is None:
            rest = text[position:].split()[0]
            raise ValueError(f"{rest!r} is not key=value (values: true, 3, 0.5 or \"text\")")
        key, value = match.groups()
        try:
            parsed = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = None
        if not isinstance(parsed, (bool, int, float, str)):
            raise ValueError(f"{key}={value}: the value must be a bool, a number or a \"quoted string\"")
        config[key] = parsed
        position = match.end()
    return config


def parse_task_options(pairs: tuple[str, ...] | list[str]) -> dict[str, str]:
    """``KEY=VALUE`` strings as task options (``-`` in keys read as ``_``); ValueError names a bad one."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise ValueError(f"--task-option {pair!r}: expected KEY=VALUE")
        options[key] = value.strip()
    return options


def check_node_config(text: str) -> dict[str, Any]:
    """``--node-config``, Flower's syntax; BadInput if it cannot be read or names a key fedgpu sets."""
    from fedgpu.errors import BadInput

    try:
        extra = parse_config_pairs(text)
    except ValueError as err:
        raise BadInput(f"--node-config: {err}") from None
    taken = sorted(set(extra) & {"partition-id", "num-partitions", "task"})
    if taken:
        raise BadInput(f"--node-config: {', '.join(taken)} {'come' if len(taken) > 1 else 'comes'} from "
                       f"{'their' if len(taken) > 1 else 'its'} own option")
    return extra
