"""A user's Flower app directory, read and checked before anything starts.

What ``fedgpu run APP_DIR`` needs from the app: its components (the ClientApp
the zygote warms up with), its run config (to check overrides against), its
dependencies (present in this environment, or the run would fail in every
child), and how many SuperNodes it was written for (``options.num-supernodes``
of its federation). Every problem is one line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from fedgpu.errors import FedgpuError

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

PYPROJECT = "pyproject.toml"
APP_CHECKED_ENV = "FEDGPU_APP_CHECKED"  # set by the launcher for its server: this app directory is checked


class AppError(FedgpuError):
    """The app directory cannot be run as it is; the message says why in one line."""


@dataclass(frozen=True)
class FlowerApp:
    directory: Path
    name: str
    version: str
    serverapp: str  # "module:attribute"
    clientapp: str
    config: dict[str, Any] = field(default_factory=dict)  # [tool.flwr.app.config]
    dependencies: tuple[str, ...] = ()
    num_supernodes: int | None = None  # what its own federation config declares

    @property
    def client_module(self) -> str:
        return self.clientapp.partition(":")[0]

    @classmethod
    def read(cls, directory: str | os.PathLike) -> "FlowerApp":
        path = Path(directory).expanduser()
        if not path.exists():
            raise AppError(f"{directory}: no such directory")
        if not path.is_dir():
            raise AppError(f"{directory}: not a directory (give the Flower app's directory, the one with {PYPROJECT})")
        pyproject = path / PYPROJECT
        if not pyproject.is_file():
            raise AppError(f"{directory}: no {PYPROJECT}: not a Flower app directory")
        try:
            data = tomllib.loads(pyproject.read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
            raise AppError(f"{pyproject}: cannot read it: {err}") from None
        flwr = data.get("tool", {}).get("flwr", {})
        components = flwr.get("app", {}).get("components")
        if not isinstance(components, dict) or not components.get("clientapp") or not components.get("serverapp"):
            raise AppError(f"{pyproject}: no [tool.flwr.app.components] with serverapp and clientapp: not a Flower app")
        for role in ("serverapp", "clientapp"):
            ref = components[role]
            if not isinstance(ref, str) or ":" not in ref or not all(ref.partition(":")[::2]):
                raise AppError(f"{pyproject}: {role} = {ref!r} is not module:attribute")
        project = data.get("project", {})
        config = flwr.get("app", {}).get("config", {})
        return cls(
            directory=path.resolve(),
            name=str(project.get("name", path.name)),
            version=str(project.get("version", "")),
            serverapp=components["serverapp"],
            clientapp=components["clientapp"],
            config=dict(config) if isinstance(config, dict) else {},
            dependencies=tuple(str(dep) for dep in project.get("dependencies", []) if isinstance(dep, str)),
            num_supernodes=_num_supernodes(flwr.get("federations", {})),
        )


def _num_supernodes(federations: Any) -> int | None:
    """``options.num-supernodes`` of the app's default federation (else of its only one)."""
    if not isinstance(federations, dict):
        return None
    named = {name: value for name, value in federations.items() if isinstance(value, dict)}
    default = federations.get("default")
    chosen = named.get(default) if isinstance(default, str) else (next(iter(named.values())) if len(named) == 1 else None)
    if chosen is None:
        candidates = [v for v in named.values() if isinstance(v.get("options"), dict) and "num-supernodes" in v["options"]]
        chosen = candidates[0] if len(candidates) == 1 else None
    count = (chosen or {}).get("options", {}).get("num-supernodes") if isinstance((chosen or {}).get("options"), dict) else None
    return count if isinstance(count, int) and not isinstance(count, bool) and count > 0 else None


def connection_num_supernodes(flwr_home: str | os.PathLike | None = None) -> int | None:
    """``options.num-supernodes`` of the default connection in the user's Flower config, if any."""
    home = Path(flwr_home or os.environ.get("FLWR_HOME") or Path.home() / ".flwr")
    try:
        data = tomllib.loads((home / "config.toml").read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    superlink = data.get("superlink", {})
    if not isinstance(superlink, dict) or not isinstance(superlink.get("default"), str):
        return None
    connection = superlink.get(superlink["default"], {})
    options = connection.get("options", {}) if isinstance(connection, dict) else {}
    count = options.get("num-supernodes") if isinstance(options, dict) else None
    return count if isinstance(count, int) and not isinstance(count, bool) and count > 0 else None


def check_dependencies(app: FlowerApp) -> tuple[list[str], list[str]]:
    """(missing packages, one-line warnings on versions that differ from the app's pins).

    Nothing is ever installed: a dependency the environment lacks would fail
    every child. Extras (``flwr[simulation]``) are not required: the run does
    not use them. A pin this environment does not meet is a warning, not a
    refusal: Flower's examples pin exact versions.
    """
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    missing, warnings = [], []
    for text in app.dependencies:
        try:
            requirement = Requirement(text)
        except InvalidRequirement:
            warnings.append(f"cannot read the dependency {text!r} of {app.name}; not checked")
            continue
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        try:
            installed = metadata.version(canonicalize_name(requirement.name))
        except metadata.PackageNotFoundError:
            missing.append(requirement.name)
            continue
        if requirement.specifier and not requirement.specifier.contains(installed, prereleases=True):
            warnings.append(f"{app.name} asks for {requirement.name}{requirement.specifier}; this environment has {installed}")
    return missing, warnings


def describe(app: FlowerApp) -> dict[str, Any]:
    """The app as report.json names it."""
    return {"name": app.name, "version": app.version, "directory": str(app.directory),
            "serverapp": app.serverapp, "clientapp": app.clientapp}


def _import_components(directory: str, refs: tuple[str, ...]) -> None:
    """In a child: import each ``module:attribute`` from the app's directory."""
    import importlib
    import sys

    sys.path.insert(0, directory)
    for ref in refs:
        module_name, _, attribute = ref.partition(":")
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)


def check_app(
    directory: str, run_config: tuple[str, ...], *, warn: Any = None, import_check: bool = True
) -> tuple[FlowerApp, tuple[str, ...]]:
    """The app and its run-config overrides, checked before anything starts; BadInput names the first problem.

    Checked: the directory and its pyproject; that every dependency is installed
    (a differing version is a warning, through ``warn``); that the overrides
    parse and name keys of the app's config; that both components import, in a
    spawned child (the app may import torch: this process must not).
    """
    from fedgpu.errors import BadInput
    from fedgpu.flower.settings import parse_config_pairs

    try:
        app = FlowerApp.read(directory)
    except AppError as err:
        raise BadInput(str(err)) from None
    missing, warnings = check_dependencies(app)
    if missing:
        raise BadInput(
            f"{app.name} needs packages this environment lacks: {', '.join(missing)} "
            "(install them first: nothing is installed at run time)"
        )
    for line in warnings:
        if warn is not None:
            warn(line)
    for text in run_config:
        try:
            overrides = parse_config_pairs(text)
        except ValueError as err:
            raise BadInput(f"--run-config: {err}") from None
        unknown = sorted(set(overrides) - set(_flat_keys(app.config)))
        if unknown:
            raise BadInput(f"--run-config: {', '.join(unknown)} not in {app.name}'s config (its keys: {', '.join(_flat_keys(app.config)) or 'none'})")
    if import_check:
        from fedgpu.isolation import IsolationError, Isolator

        with Isolator("spawn") as isolator:
            for role, ref in (("clientapp", app.clientapp), ("serverapp", app.serverapp)):
                try:
                    isolator.run(_import_components, (str(app.directory), (ref,)), timeout=300)
                except IsolationError as err:
                    raise BadInput(f"{app.name}'s {role} {ref} does not import: {err.reason}") from None
    return app, tuple(text for text in run_config if text.strip())


def _flat_keys(config: dict[str, Any], prefix: str = "") -> list[str]:
    """Keys as ``--run-config`` names them: nested tables joined with dots."""
    keys = []
    for key, value in config.items():
        if isinstance(value, dict):
            keys += _flat_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys
