"""A user's Flower app directory, read and checked before anything starts.

What ``fedgpu run APP_DIR`` needs from the app: its components (the ClientApp
the zygote warms up with), its run config (to check overrides against), its
dependencies (present in this environment, or the run would fail in every
child), and its federation: how many SuperNodes it was written for and what
each ClientApp may use (``options.num-supernodes``, ``options.backend.client-resources``).
Every problem is one line.

The app's directory is only ever read. The run submits a private copy (the
FAB that `flwr run` would build, unpacked: no ``[tool.flwr.federations]`` for
Flower to migrate out of the user's pyproject.toml), and every import of the
app's modules here and in the zygote writes no bytecode.
"""

from __future__ import annotations

import io
import os
import zipfile
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

from fedgpu.errors import FedgpuError
from fedgpu.flower.federation_settings import PYPROJECT, FederationSettings, connection_federation, table_federation

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]



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
    federation: FederationSettings = field(default_factory=FederationSettings)

    @property
    def client_module(self) -> str:
        return self.clientapp.partition(":")[0]

    @property
    def num_supernodes(self) -> int | None:
        """How many SuperNodes its federation declares."""
        return self.federation.num_supernodes

    @classmethod
    def read(cls, directory: str | os.PathLike, flwr_home: str | os.PathLike | None = None) -> FlowerApp:
        """The app in ``directory`` (read only); its federation from there, else from ``flwr_home``'s
        default connection (default ``$FLWR_HOME``, else ``~/.flwr``)."""
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
        federations = flwr.get("federations")
        return cls(
            directory=path.resolve(),
            name=str(project.get("name", path.name)),
            version=str(project.get("version", "")),
            serverapp=components["serverapp"],
            clientapp=components["clientapp"],
            config=dict(config) if isinstance(config, dict) else {},
            dependencies=tuple(str(dep) for dep in project.get("dependencies", []) if isinstance(dep, str)),
            federation=(table_federation(federations) if isinstance(federations, dict)
                        else connection_federation(flwr_home)),
        )


def private_copy(directory: str | os.PathLike, parent: str | os.PathLike) -> Path:
    """``parent/app``: the app in ``directory`` as `flwr run` packages it (its FAB), unpacked; what a run submits.

    The copy's pyproject.toml has no ``[tool.flwr.federations]`` (Flower leaves
    it out of every FAB), so `flwr run` on it migrates nothing, and whatever
    `flwr run` writes beside it (bytecode of the package it looks into) stays in
    the copy. ``parent`` is the run's private directory. AppError if Flower
    cannot package the app (it changed since it was checked).
    """
    from fedgpu.flower.internals.apps import build_fab
    from fedgpu.private_dirs import subdir

    try:
        fab = build_fab(directory)
        target = Path(subdir(str(parent), "app"))
        with zipfile.ZipFile(io.BytesIO(fab)) as archive:
            for member in archive.infolist():
                if not member.filename.startswith(".info/"):  # the FAB's manifest: `flwr run` writes its own
                    archive.extract(member, target)  # names with ".." or a leading "/" stay inside target
    except (ValueError, OSError, zipfile.BadZipFile) as err:
        raise AppError(f"cannot package the app {directory} as `flwr run` would: {_one_line(err)}") from None
    return target


def _one_line(err: BaseException) -> str:
    return "; ".join(line.strip("- ").strip() for line in str(err).splitlines() if line.strip())


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
            warnings.append(f"{app.name} asks for {requirement.name}{requirement.specifier}; "
                            f"this environment has {installed}")
    return missing, warnings


def describe(app: FlowerApp) -> dict[str, Any]:
    """The app as report.json names it."""
    return {"name": app.name, "version": app.version, "directory": str(app.directory),
            "serverapp": app.serverapp, "clientapp": app.clientapp, "federation": app.federation.describe()}


@dataclass(frozen=True)
class ImportFacts:
    """What importing a component left behind in the child that imported it."""

    threads: tuple[str, ...]  # threads besides the main one: their Python names, else "N native"
    cuda_initialized: bool
    # What importing the ServerApp raised afterwards, in the same child: (type name, message), or None.
    server_error: tuple[str, str] | None = None


def _import_components(
    directory: str, client_ref: str, server_ref: str, workdir: str, warm_ups: tuple[str, ...] = ()
) -> ImportFacts:
    """In a child: import the ClientApp's ``module:attribute`` from the app's directory as the zygote would, then
    the ServerApp's.

    In ``workdir`` (empty, like the run directory a zygote starts in: a file
    opened relative to it at import fails here as it would there), after
    ``warm_ups`` (what the zygote imports first), writing no bytecode into the
    app. What a zygote would refuse to fork from is read before the ServerApp
    is imported; both share one child because each import costs seconds
    (torch), and the ServerApp's error comes back as data so that the caller
    can name its role.
    """
    import sys

    from fedgpu.isolation.zygote.warm import call_warm_up

    sys.dont_write_bytecode = True
    os.chdir(workdir)
    for spec in warm_ups:
        call_warm_up(spec)
    sys.path.insert(0, directory)
    _import_ref(client_ref)
    facts = _left_behind()
    try:
        _import_ref(server_ref)
    except Exception as err:  # noqa: BLE001 - any error at import is the app's, reported as it was raised
        return replace(facts, server_error=(type(err).__name__, str(err)))
    return facts


def _import_ref(ref: str) -> None:
    import importlib

    module_name, _, attribute = ref.partition(":")
    target: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        target = getattr(target, part)


def _left_behind() -> ImportFacts:
    """The threads and CUDA state of this process, as a zygote would find them."""
    import sys
    import threading

    from fedgpu.isolation.zygote.warm import native_threads

    others = tuple(thread.name for thread in threading.enumerate() if thread is not threading.main_thread())
    native = len(native_threads()) - 1  # started by native code (a library's pool): no Python name
    torch = sys.modules.get("torch")
    return ImportFacts(threads=others or ((f"{native} native",) if native > 0 else ()),
                       cuda_initialized=bool(torch is not None and torch.cuda.is_initialized()))


def check_app(
    directory: str, run_config: tuple[str, ...], *, warn: Any = None, import_check: bool = True
) -> tuple[FlowerApp, tuple[str, ...]]:
    """The app and its run-config overrides, checked before anything starts; BadInput names the first problem.

    Checked: the directory and its pyproject; that Flower can package it (as
    `flwr run` would); that every dependency is installed (a differing version
    is a warning, through ``warn``); that the overrides parse, name keys of the
    app's config and have the types of its values; that both components import,
    each in a spawned child (the app may import torch: this process must not)
    working in an empty directory, and that the ClientApp's module leaves that
    child as a zygote needs it: single-threaded, CUDA untouched.
    """
    from fedgpu.errors import BadInput
    from fedgpu.flower.config import parse_config_pairs
    from fedgpu.flower.internals.apps import build_fab

    try:
        app = FlowerApp.read(directory)
    except AppError as err:
        raise BadInput(str(err)) from None
    try:
        build_fab(app.directory)
    except (ValueError, OSError) as err:
        raise BadInput(f"{app.name}: Flower cannot package {app.directory}: {_one_line(err)}") from None
    missing, warnings = check_dependencies(app)
    if missing:
        raise BadInput(
            f"{app.name} needs packages this environment lacks: {', '.join(missing)} "
            "(install them first: nothing is installed at run time)"
        )
    for line in warnings:
        if warn is not None:
            warn(line)
    defaults = _flat_config(app.config)
    for text in run_config:
        try:
            overrides = parse_config_pairs(text)
        except ValueError as err:
            raise BadInput(f"--run-config: {err}") from None
        unknown = sorted(set(overrides) - set(defaults))
        if unknown:
            keys = ", ".join(defaults) or "none"
            raise BadInput(f"--run-config: {', '.join(unknown)} not in {app.name}'s config (its keys: {keys})")
        for key, value in overrides.items():
            problem = override_problem(app.name, key, value, defaults[key])
            if problem:
                raise BadInput(f"--run-config: {problem}")
    if import_check:
        _check_imports(app)
    return app, tuple(text for text in run_config if text.strip())


def _check_imports(app: FlowerApp) -> None:
    """Both components imported in one child, as the run will import them; BadInput if either cannot be."""
    from fedgpu.errors import BadInput
    from fedgpu.flower.warm_ups import RUNNER
    from fedgpu.isolation import ChildRaised, IsolationError, Isolator
    from fedgpu.private_dirs import make_private_dir, remove

    def cannot_import(role: str, ref: str, err: IsolationError) -> BadInput:
        hint = (" (fedgpu imports it in the run directory, not here: open the app's files relative to "
                "its module's __file__)"
                if getattr(err, "type_name", "") in ("FileNotFoundError", "NotADirectoryError") else "")
        return BadInput(f"{app.name}'s {role} {ref} does not import: {err.reason}{hint}")

    workdir = make_private_dir("check")
    try:
        with Isolator("spawn", env=_zygote_like_env()) as isolator:
            # The ClientApp's module is what the zygote imports, after our runner; the ServerApp runs in
            # Flower's own process, never forked.
            try:
                outcome = isolator.run(_import_components,
                                       (str(app.directory), app.clientapp, app.serverapp, workdir, (RUNNER,)),
                                       timeout=300)
            except IsolationError as err:
                raise cannot_import("clientapp", app.clientapp, err) from None
        facts: ImportFacts = outcome.value
        module = app.client_module
        if facts.threads:
            raise BadInput(
                f"{app.name}'s clientapp module {module} starts threads when imported "
                f"({', '.join(facts.threads)}): "
                "fedgpu forks every message from a warm process, which must be single-threaded "
                "(start them inside the ClientApp's functions)"
            )
        if facts.cuda_initialized:
            raise BadInput(
                f"{app.name}'s clientapp module {module} initialises CUDA when imported: fedgpu forks every "
                "message from a warm process, whose children could not use the GPU (touch CUDA inside the "
                "ClientApp's functions)"
            )
        if facts.server_error is not None:
            # Told as the isolation core tells any error raised in a child.
            raise cannot_import("serverapp", app.serverapp, ChildRaised(*facts.server_error, remote_traceback=""))
    finally:
        remove(workdir)


def _zygote_like_env() -> dict[str, str]:
    """The zygote's environment where it differs from ours: single-threaded libraries (unless set), no bytecode."""
    from fedgpu.isolation.zygote.warm import SINGLE_THREADED_ENV

    env = {name: value for name, value in SINGLE_THREADED_ENV.items() if name not in os.environ}
    return {**env, "PYTHONDONTWRITEBYTECODE": "1"}


WELL_KNOWN_COUNTS = {"num-server-rounds": "the number of rounds"}  # Flower's own templates' keys: whole numbers >= 1


def override_problem(app_name: str, key: str, value: Any, default: Any) -> str | None:
    """Why ``key=value`` cannot override the app's ``default`` (None if it can).

    Flower passes an override on as it is: a string where the app expects a
    number fails inside the ServerApp, after everything has started. The type
    must be the default's (a float accepts a whole number too).
    """
    from fedgpu.flower.config import toml_value

    # (type, what a value of it is, what a key with a default of it takes); bool before int: True is an int too.
    kinds = ((bool, "a boolean", "true or false"), (int, "a whole number", "a whole number"),
             (float, "a fractional number", "a number"), (str, "a string", 'a "quoted string"'))
    expected = next((kind for kind in kinds if isinstance(default, kind[0])), None)
    if expected is None:
        return None  # an array, or a type Flower's run config does not have: Flower decides
    given = next(kind for kind in kinds if isinstance(value, kind[0]))
    if not (given is expected or (expected[0] is float and given[0] is int)):
        return (f"{key}={toml_value(value)} is {given[1]}; {app_name}'s {key} takes {expected[2]} "
                f"(default {toml_value(default)})")
    if key in WELL_KNOWN_COUNTS and expected[0] is int and value < 1:
        return f"{key}={toml_value(value)}: {WELL_KNOWN_COUNTS[key]} must be at least 1"
    return None


def _flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The app's config as ``--run-config`` names its keys (nested tables joined with dots), with the defaults."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flat_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
