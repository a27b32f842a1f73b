"""The options several commands share, and the types that check them as click parses them.

A value no command could use (``nan`` seconds, a timeout of ``1e-300`` s, an
umask that is not octal) is refused here, with click's one line, before a
command's plan (``fedgpu.plans``) checks how the options go together.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import click

from fedgpu.flower.settings import RunSettings

positive = click.IntRange(min=1)
MAX_SECONDS = 30 * 24 * 3600.0
# A message must live long enough to reach a node, run, and send its reply back
# (the runner keeps at least 5 s of it for the reply): shorter ones only expire.
MIN_MESSAGE_SECONDS = 10.0


class PositiveNumber(click.FloatRange):
    """A finite number above 0 (a rate, a factor, MiB).

    ``FloatRange(min=0, min_open=True)`` alone lets ``nan`` through (it fails
    no comparison) and ``inf`` (it has no upper bound).
    """

    what = "a finite number"

    def __init__(self) -> None:
        super().__init__(min=0, min_open=True)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not {self.what}", param, ctx)
        return number


class Seconds(PositiveNumber):
    """A timeout in seconds: finite, at least ``least``, at most ``MAX_SECONDS``.

    A value that is positive but tiny (``1e-300``) would start everything and
    then expire before any process could answer; one past the bound would
    overflow the waits it becomes. Every seconds-valued option takes this type.
    """

    what = "a finite number of seconds"

    def __init__(self, least: float = 1.0) -> None:
        super().__init__()
        self.least = least

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        number = super().convert(value, param, ctx)
        if number < self.least:
            self.fail(f"{number:g} s is too short: at least {self.least:g} s", param, ctx)
        if number > MAX_SECONDS:
            self.fail(f"{number:g} s is too long: at most {MAX_SECONDS:.0f} s (30 days)", param, ctx)
        return number


positive_number = PositiveNumber()
seconds = Seconds()


def _options(*decorators: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Apply option decorators in the order they are listed (as --help shows them)."""

    def apply(command: Any) -> Any:
        for decorator in reversed(decorators):
            command = decorator(command)
        return command

    return apply


def _placement_options() -> list[Callable[[Any], Any]]:
    from fedgpu.names import ENV_ESTIMATE, ENV_GPUS, ENV_POLICY, ENV_TIMEOUT
    from fedgpu.nvml.placement import POLICIES

    return [
        click.option("--gpus", envvar=ENV_GPUS, default=None,
                     help="GPU indices children may use, e.g. 0,2 [default: every GPU visible]."),
        click.option("--placement", envvar=ENV_POLICY, type=click.Choice(POLICIES), default="free", show_default=True,
                     help="The GPU with most free memory, or round-robin among those with room."),
        click.option("--gpu-mem", envvar=ENV_ESTIMATE, type=positive_number, default=None,
                     help="A child's estimated peak GPU memory in MiB until one has been measured [default: 1024]."),
        click.option("--admission-timeout", envvar=ENV_TIMEOUT, type=seconds, default=600.0, show_default=True,
                     help="Seconds a child may wait for GPU memory before its message fails."),
    ]


placement_options = _options(*_placement_options())

# What a run of one of fedgpu's own tasks is: `fedgpu server` and `fedgpu run` take the same.
task_run_options = _options(
    click.option("--rounds", type=positive, default=RunSettings.num_rounds, show_default=True,
                 help="Federated rounds."),
    click.option("--min-clients", type=positive, default=None,
                 help="Clients connected before round 1 [default: server 2; run: --nodes]."),
    click.option("--sampled", type=positive, default=None,
                 help="Clients that train in each round [default: server 2; run: 5, at most --nodes]."),
    click.option("--eval-sampled", type=click.IntRange(min=0), default=0, show_default=True,
                 help="Clients that evaluate in each round."),
    click.option("--task", default="digits", show_default=True, help="Task name or package.module:TaskClass."),
    click.option("--lr", type=positive_number, default=None,
                 help="Learning rate [default: the task's, digits 0.05, the others 0.01]."),
    click.option("--lr-decay", type=positive_number, default=RunSettings.lr_decay, show_default=True,
                 help="lr of round r = lr * decay^(r-1)."),
    click.option("--local-epochs", type=positive, default=None,
                 help="Epochs per round [default: the task's, digits 3, the others 1]."),
    click.option("--batch-size", type=click.IntRange(min=0), default=RunSettings.batch_size, show_default=True,
                 help="0: the task's default."),
    click.option("--partitioner", type=click.Choice(["iid", "dirichlet"]), default="iid", show_default=True),
    click.option("--alpha", type=positive_number, default=RunSettings.alpha, show_default=True,
                 help="Dirichlet concentration."),
    click.option("--seed", type=int, default=RunSettings.seed, show_default=True),
    click.option("--data-files", default="", help="Local dataset files for tasks that would download (e.g. cifar10)."),
    click.option("--task-option", "task_options", multiple=True, metavar="KEY=VALUE",
                 help="A task's own option, e.g. weights=none or partitions=20 (repeatable)."),
    click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
    click.option("--threads", type=click.IntRange(min=0), default=1, show_default=True,
                 help="torch CPU threads per child (0: torch's default)."),
    click.option("--message-timeout", type=Seconds(MIN_MESSAGE_SECONDS), default=RunSettings.message_timeout,
                 show_default=True,
                 help=f"Seconds a round waits for replies (at least {MIN_MESSAGE_SECONDS:g}); "
                      "a message's child may run as long."),
    click.option("--start-timeout", type=seconds, default=RunSettings.start_timeout, show_default=True,
                 help="Seconds a round waits for enough client nodes before the run fails (exit 3)."),
)

# A Flower app of the user's: `fedgpu server --app` and `fedgpu run APP_DIR`.
run_config_option = click.option(
    "--run-config", "run_config", multiple=True, metavar="'KEY=VALUE ...'",
    help="Override the app's run config, as `flwr run --run-config` takes it (repeatable).",
)


# `fedgpu run` and `fedgpu server`: a ServerApp that never returns is ended.
run_timeout_option = click.option(
    "--run-timeout", type=seconds, default=None,
    help="Seconds the run may take once submitted; then it is stopped (exit 5) [default: none, no limit].",
)

# What every client node takes from its launcher: `fedgpu client` and `fedgpu run`.
node_options = _options(
    click.option("--node-config", default="",
                 help='More node config for your ClientApp, Flower\'s syntax: \'key=1 name="x"\'.'),
    click.option("--timeout", type=seconds, default=None,
                 help="Seconds a message's child may run [default: the run's message timeout, less a margin "
                      "for the reply; for an app's messages, 600]."),
)


def _read_umask(_ctx: click.Context, _param: click.Parameter, value: str) -> int:
    from fedgpu.run_dir import parse_umask

    try:
        return parse_umask(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an octal umask such as 077 or 027") from None


umask_option = click.option(
    "--umask", default="077", show_default=True, callback=_read_umask, metavar="OCTAL",
    help="Mode mask for the run's files: 077 keeps them yours alone; 027 shares them read-only with your group.",
)
