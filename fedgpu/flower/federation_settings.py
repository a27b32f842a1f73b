"""What an app's federation asks for: how many SuperNodes, and what each ClientApp may use.

Flower names these in a federation's ``options`` table: ``num-supernodes``
and ``backend.client-resources`` (``num-cpus``, ``num-gpus``). Before Flower
1.42 the table lives in the app's pyproject.toml (``[tool.flwr.federations]``);
Flower 1.42's migration moves it into ``$FLWR_HOME/config.toml``
(``[superlink.NAME]``). Both are read; values that cannot be right are left out.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedgpu.names import FLWR_HOME_ENV

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

PYPROJECT = "pyproject.toml"


@dataclass(frozen=True)
class FederationSettings:
    """What an app's federation asks for, as Flower's simulation options name it.

    Read from ``[tool.flwr.federations]`` in the app's pyproject.toml (the form
    before Flower 1.42), else from the default connection in
    ``$FLWR_HOME/config.toml`` (where Flower 1.42's migration moves it:
    ``[superlink.NAME]`` with the same ``options.*`` keys).
    """

    num_supernodes: int | None = None  # options.num-supernodes
    num_cpus: float | None = None  # options.backend.client-resources.num-cpus: per ClientApp
    num_gpus: float | None = None  # options.backend.client-resources.num-gpus
    source: str = ""  # where they were read: "pyproject.toml [tool.flwr.federations.NAME]", ...

    @classmethod
    def from_options(cls, options: Any, source: str) -> FederationSettings:
        """From a federation's or a connection's ``options`` table; values that cannot be right are left out."""
        if not isinstance(options, dict):
            return cls(source=source)
        backend = options.get("backend")
        resources = backend.get("client-resources") if isinstance(backend, dict) else None
        resources = resources if isinstance(resources, dict) else {}
        count = options.get("num-supernodes")
        return cls(
            num_supernodes=count if _is_number(count, whole=True) and count > 0 else None,
            num_cpus=_resource(resources.get("num-cpus")),
            num_gpus=_resource(resources.get("num-gpus")),
            source=source,
        )

    def describe(self) -> dict[str, Any]:
        """As report.json names it (Flower's keys)."""
        return {"num-supernodes": self.num_supernodes,
                "client-resources": {"num-cpus": self.num_cpus, "num-gpus": self.num_gpus}, "from": self.source or None}


def _is_number(value: Any, *, whole: bool = False) -> bool:
    kinds = int if whole else (int, float)
    return isinstance(value, kinds) and not isinstance(value, bool)


def _resource(value: Any) -> float | None:
    return value if _is_number(value) and value >= 0 else None


def table_federation(federations: dict[str, Any]) -> FederationSettings:
    """``[tool.flwr.federations]``: its default federation, else its only one, else the only one with
    ``options.num-supernodes``."""
    named = {name: value for name, value in federations.items() if isinstance(value, dict)}
    default = federations.get("default")
    if isinstance(default, str):
        name = default if default in named else None
    elif len(named) == 1:
        name = next(iter(named))
    else:
        with_count = [key for key, value in named.items()
                      if isinstance(value.get("options"), dict) and "num-supernodes" in value["options"]]
        name = with_count[0] if len(with_count) == 1 else None
    if name is None:
        return FederationSettings()
    return FederationSettings.from_options(named[name].get("options"), f"{PYPROJECT} [tool.flwr.federations.{name}]")


def connection_federation(flwr_home: str | os.PathLike | None = None) -> FederationSettings:
    """The ``options`` of the default connection in a Flower config (Flower 1.42's form), if any."""
    home = Path(flwr_home or os.environ.get(FLWR_HOME_ENV) or Path.home() / ".flwr")
    try:
        data = tomllib.loads((home / "config.toml").read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return FederationSettings()
    superlink = data.get("superlink", {})
    if not isinstance(superlink, dict) or not isinstance(superlink.get("default"), str):
        return FederationSettings()
    name = superlink["default"]
    connection = superlink.get(name)
    if not isinstance(connection, dict):
        return FederationSettings()
    return FederationSettings.from_options(connection.get("options"), f"{home / 'config.toml'} [superlink.{name}]")
