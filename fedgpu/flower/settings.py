"""One run's settings, as CLI options and as Flower run config (hyphenated keys)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any

from fedgpu.tasks.work import WorkSettings

ISOLATION_MODES = ("zygote", "spawn", "none")


def zygote_warm_ups(*tasks: str) -> list[str]:
    """What a zygote serving these tasks imports and exercises before it forks.

    The runner and the ClientApp module (and the flwr modules they import) are
    what every child unpickles its call into; each task's own warm-up builds its
    model and runs one CPU step.
    """
    warm_ups = ["torch", "fedgpu.flower.runner", "fedgpu.flower.client_app"]
    return warm_ups + [f"fedgpu.tasks.work:warm_up={task}" for task in tasks]


def app_warm_ups(client_module: str) -> list[str]:
    """What a zygote serving a user's Flower app imports: our runner and the app's ClientApp
    module, with what it imports (torch, if it uses it); nothing is exercised, CUDA least of all."""
    return ["fedgpu.flower.runner", client_module]


def exec_zygote(directory: str, tasks: tuple[str, ...], app_dir: str | None, parent_pid: int | None, *,
                run_data: str | None = None) -> None:
    """``fedgpu zygote``: check, then become the zygote process (same pid, a fresh interpreter)."""
    import os
    import sys

    from fedgpu.errors import BadInput
    from fedgpu.isolation.procs import pythonpath_with_package, watch_parent
    from fedgpu.isolation.zygote import ZygoteError
    from fedgpu.isolation.zygote.server import SINGLE_THREADED_ENV, prepare_directory

    watch_parent(parent_pid)
    path = pythonpath_with_package()
    extra_env: dict[str, str] = {}
    if app_dir:
        from fedgpu.flower.app import AppError, FlowerApp

        if tasks:
            raise BadInput("--app and --task: a zygote warms up for one or the other")
        try:
            app = FlowerApp.read(app_dir)
        except AppError as err:
            raise BadInput(str(err)) from None
        warm_ups = app_warm_ups(app.client_module)
        path = os.pathsep.join([str(app.directory), path])
        # Nothing is ever written into the user's app: the zygote and every child it forks import
        # the app's modules without writing __pycache__ beside them.
        extra_env["PYTHONDONTWRITEBYTECODE"] = "1"
    else:
        from fedgpu.tasks import UnknownTaskError, resolve_task

        for task in tasks or ("digits",):
            try:
                resolve_task(task)
            except UnknownTaskError as err:
                raise BadInput(str(err)) from None
        warm_ups = zygote_warm_ups(*(tasks or ("digits",)))
        if run_data:
            try:
                wanted = json.loads(run_data)
                if wanted.get("task") not in (tasks or ("digits",)) or int(wanted["partitions"]) < 1:
                    raise ValueError
            except (ValueError, TypeError, KeyError, AttributeError):
                raise BadInput('--run-data: expected {"task": one of --task, "options": {...}, "partitions": N >= 1}') from None
            warm_ups.append(f"fedgpu.tasks.work:warm_up_run={json.dumps(wanted)}")
    try:  # the zygote checks again; here a bad path is one line before anything is imported
        prepare_directory(directory)
    except ZygoteError as err:
        raise BadInput(f"--dir {directory}: {err}") from None
    # This process has loaded flwr and numpy (and their thread pools) already:
    # become a fresh interpreter, same pid, with single-threaded libraries.
    parent = ["--parent-pid", str(parent_pid)] if parent_pid else []
    argv = [sys.executable, "-m", "fedgpu.isolation.zygote", "--dir", directory, *parent, *warm_ups]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, {**SINGLE_THREADED_ENV, **os.environ, **extra_env, "PYTHONPATH": path})


def toml_value(value: object) -> str:
    """A value as TOML, as Flower reads run and node config."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


@dataclass(frozen=True)
class RunSettings:
    task: str = "digits"
    num_rounds: int = 3
    min_clients: int = 2
    sampled: int = 2  # exactly this many clients train each round
    eval_sampled: int = 0  # clients that evaluate the global model on their data
    lr: float = 0.0  # 0: the task's own default_lr
    lr_decay: float = 1.0  # lr of round r = lr * lr_decay ** (r - 1)
    local_epochs: int = 0  # 0: the task's own default_local_epochs
    batch_size: int = 0  # 0: the task's own default
    partitioner: str = "iid"
    alpha: float = 0.5  # Dirichlet concentration
    seed: int = 42
    data_files: str = ""  # local dataset files instead of a hub download
    task_options_json: str = ""  # more task options (--task-option KEY=VALUE), a JSON object of strings
    run_dir: str = ""
    isolation: str = "zygote"  # how the server's own torch work is isolated
    device: str = "auto"
    threads: int = 1
    message_timeout: float = 600.0  # how long a round waits for its replies (and a message may run)
    start_timeout: float = 300.0  # how long a round waits for enough client nodes

    def to_run_config(self) -> dict[str, Any]:
        return {name.replace("_", "-"): value for name, value in asdict(self).items()}

    @classmethod
    def from_run_config(cls, config: dict[str, Any]) -> RunSettings:
        kinds = {f.name: type(getattr(cls(), f.name)) for f in fields(cls)}
        values = {}
        for key, value in config.items():
            name = key.replace("-", "_")
            if name in kinds:
                values[name] = kinds[name](value)
        return cls(**values)

    def round_lr_scale(self, server_round: int) -> float:
        """What round ``server_round`` multiplies the learning rate by."""
        return self.lr_decay ** (server_round - 1)

    def work(self) -> WorkSettings:
        return WorkSettings(self.task, self.task_options(), self.device, self.threads)

    def task_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"partitioner": self.partitioner, "alpha": self.alpha, "seed": self.seed}
        if self.batch_size:
            options["batch_size"] = self.batch_size
        if self.data_files:
            options["data_files"] = self.data_files
        if self.task_options_json:
            options.update(json.loads(self.task_options_json))
        return options


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
