"""The ``fedgpu`` command: ``run``, ``server``, ``client``, ``zygote``, ``report``, ``bench-models``.

Each command parses its options and hands them to one function of its layer.
Bad input is one line on stderr and exit code 2, before anything starts.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from fedgpu.errors import BadInput
from fedgpu.flower.settings import ISOLATION_MODES
from fedgpu.names import FLOWER_DEFAULTS, PROG_ENV, ZYGOTE_ENV
from fedgpu.plans.options import (
    node_options,
    placement_options,
    positive,
    run_config_option,
    run_timeout_option,
    seconds,
    task_run_options,
    umask_option,
)

EXIT_USAGE = 2

@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Flower federations whose clients hold GPU memory only while they train."""
    for key, value in FLOWER_DEFAULTS.items():
        os.environ.setdefault(key, value)
    # Flower starts its own helpers (flower-superexec, flwr-serverapp) by name:
    # make those of the environment running us win, whatever PATH the caller had.
    bin_dir = os.path.dirname(sys.executable)
    os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")


@cli.command(context_settings={"show_default": True})
@click.argument("positional", nargs=-1, metavar="[APP_DIR | CLIENTS [MIN [SAMPLED [ROUNDS]]]]")
@click.option("--app", "app_dir", type=click.Path(), default=None, help="A Flower app directory (the same as APP_DIR).")
@click.option("--nodes", type=click.IntRange(1, 999_999), default=None,
              help="Client nodes to start (CLIENTS) [default: the app's options.num-supernodes, else 10].")
@run_config_option
@task_run_options
@run_timeout_option
@node_options
@click.option("--isolation", type=click.Choice(["zygote", "spawn"]), default="zygote",
              help="zygote: one warm process forks each message's child; spawn: a fresh interpreter each.")
@click.option("--simulation", is_flag=True,
              help="Virtual clients in one process (Flower's Simulation Runtime), no SuperLink, each message in a "
                   "child.")
@click.option("--workers", type=positive, default=None,
              help="With --simulation: messages in flight at once [default: the app's client-resources as Flower "
                   "counts them, else one per CPU core].")
@click.option("--mp/--no-mp", default=True,
              help="Each message in a short-lived child (--mp), or in the long-lived node (the baseline).")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="SuperLink port [default: a free one].")
@click.option("--run-dir", type=click.Path(file_okay=False), default=None,
              help="Output directory [default: runs/<timestamp>].")
@click.option("--tls", is_flag=True,
              help="TLS and SuperNode authentication on 127.0.0.1 (certificates in RUN_DIR/certs).")
@click.option("--role", type=click.Choice(["all", "server", "nodes"]), default="all",
              help="all: the whole federation on this host; server: the SuperLink and the run (its reports), no client "
                   "node; nodes: this host's zygote and client nodes (--partitions) for another host's --superlink.")
@click.option("--host", default=None,
              help="Address the SuperLink listens on, e.g. 0.0.0.0 with --role server [default: 127.0.0.1].")
@click.option("--superlink", default=None, metavar="HOST:PORT", help="With --role nodes: the server's SuperLink.")
@click.option("--partitions", default=None, metavar="I,J,...",
              help="With --role nodes: the partition ids (below CLIENTS) of the client nodes to start here [default: "
                   "all].")
@click.option("--log-dir", type=click.Path(file_okay=False), default=None,
              help="With --role nodes: where the zygote and the client nodes log [default: RUN_DIR].")
@click.option("--certs", type=click.Path(file_okay=False), default=None,
              help="With --role server or nodes: TLS and SuperNode authentication with the certificates and keys that "
                   "launchers/make-certs.sh made in this directory.")
@click.option("--force", is_flag=True,
              help="Start even when this host seems too small for the client nodes, or --run-dir holds a run (its "
                   "outputs are replaced).")
@umask_option
@click.option("--check", is_flag=True, help="Only check the options and exit 0; start nothing.")
@placement_options
def run(**options: Any) -> None:
    """Run a whole federation on this host: a Flower app (APP_DIR), or one of fedgpu's tasks.

    A SuperLink, the host's zygote, N client nodes whose messages each run in a
    short-lived child, the memory monitor and the reports; everything is stopped
    at the end, on Ctrl-C or TERM. Exit 0 only when Flower says the run completed.

    For fedgpu's tasks the numbers are CLIENTS (--nodes), MIN (--min-clients),
    SAMPLED (--sampled) and ROUNDS (--rounds), as ./run.sh takes them.
    """
    from fedgpu.launch import Launcher
    from fedgpu.plans.run import plan_run

    os.umask(options["umask"])  # every file and directory of the run, Flower's too
    context = click.get_current_context()
    given = {name for name in options if context.get_parameter_source(name) in _GIVEN}
    plan = plan_run(
        options, prog=_prog(), given=given, warn=lambda line: click.echo(f"{_prog()}: warning: {line}", err=True),
        server_argv=lambda values: forward_options(server, values),
        node_argv=lambda values: forward_options(client, values),
    )
    if options["check"]:
        click.echo(f"{_prog()}: ok: {plan.describe()}")
        return
    sys.exit(Launcher(plan, click.echo, lambda line: click.echo(line, err=True)).run())


@cli.command()
@click.option("--app", "app_dir", type=click.Path(), default=None,
              help="A Flower app directory to run instead of a fedgpu task.")
@run_config_option
@task_run_options
@run_timeout_option
@click.option("--wait-nodes", type=click.IntRange(min=0), default=0, show_default=True,
              help="Submit the run once this many client nodes are registered (0: at once); "
                   "exit 3 after --start-timeout.")
@click.option("--simulation-nodes", type=click.IntRange(min=0), default=0, show_default=True,
              help="Run the app on this many virtual nodes in one simulation host instead of a SuperLink (0: a "
                   "SuperLink).")
@click.option("--workers", type=positive, default=None,
              help="With --simulation-nodes: messages in flight at once [default: one per CPU core].")
@node_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the SuperLink listens on.")
@click.option("--port", type=click.IntRange(1, 65535), default=9092, show_default=True,
              help="SuperLink port (Fleet, Control, Runtime APIs).")
@click.option("--run-dir", type=click.Path(file_okay=False), default=None,
              help="Output directory [default: runs/<timestamp>].")
@click.option("--isolation", type=click.Choice(ISOLATION_MODES), default="zygote", show_default=True,
              help="How the server's own torch work runs.")
@click.option("--parent-pid", type=int, default=None, help="Exit when this process dies.")
@click.option("--force", is_flag=True, help="Replace the outputs of a run already in --run-dir.")
@umask_option
@click.option("--check", is_flag=True,
              help="Only check the options (task, data, GPUs, port) and exit 0; start nothing.")
@click.option("--ssl-ca-certfile", type=click.Path(exists=True, dir_okay=False), default=None,
              help="TLS: the CA certificate (with --ssl-certfile and --ssl-keyfile; see launchers/make-certs.sh).")
@click.option("--ssl-certfile", type=click.Path(exists=True, dir_okay=False), default=None,
              help="TLS: the SuperLink's certificate.")
@click.option("--ssl-keyfile", type=click.Path(exists=True, dir_okay=False), default=None,
              help="TLS: the SuperLink certificate's private key.")
@click.option("--auth-public-keys", type=click.Path(exists=True), default=None,
              help="SuperNode authentication: a public key, or a directory of *.pub; only those nodes may join (needs "
                   "TLS).")
@placement_options
def server(**options: Any) -> None:
    """Run a SuperLink and a run on it (fedgpu's ServerApp, or --app's) until the run ends."""
    from fedgpu.flower.server import run_federation
    from fedgpu.plans.server import plan_server

    os.umask(options["umask"])
    plan = plan_server(options)
    if options["check"]:
        return
    sys.exit(run_federation(plan, click.echo))


@cli.command()
@click.option("--superlink", required=True, help="SuperLink address HOST:PORT.")
@click.option("--partition-id", type=click.IntRange(min=0), required=True)
@click.option("--num-partitions", type=positive, required=True)
@click.option("--mp/--no-mp", default=False, help="Run each message in a short-lived child (--mp) or in this process.")
@click.option("--isolation", type=click.Choice([m for m in ISOLATION_MODES if m != "none"]), default="zygote",
              show_default=True,
              help="Child mode with --mp.")
@click.option("--zygote", "zygote_dir", envvar=ZYGOTE_ENV, type=click.Path(), default=None,
              help="Directory of the host's shared zygote (`fedgpu zygote`) [default: $FEDGPU_ZYGOTE, else a private "
                   "one].")
@click.option("--task", default=None, help="Refuse runs of any other task.")
@node_options
@click.option("--runtime-port", type=click.IntRange(1, 65535), default=None,
              help="Port of this node's Runtime API on 127.0.0.1 [default: a free one].")
@click.option("--max-wait-time", type=seconds, default=60.0, show_default=True,
              help="Seconds without the SuperLink before giving up: at start, exit 2; once running, exit 3.")
@click.option("--parent-pid", type=int, default=None, help="Exit when this process dies.")
@click.option("--root-certificates", type=click.Path(exists=True, dir_okay=False), default=None,
              help="TLS: the CA certificate the SuperLink's certificate is checked against [default: insecure].")
@click.option("--auth-private-key", type=click.Path(exists=True, dir_okay=False), default=None,
              help="SuperNode authentication: this node's private key (its public key registered with the server; "
                   "needs TLS).")
@click.option("--check", is_flag=True, help="Only check the options and exit 0; connect to nothing.")
@placement_options
def client(**options: Any) -> None:
    """Run a long-lived client node; with --mp each message runs in a child."""
    from fedgpu.flower.node import run_planned_node
    from fedgpu.plans.client import plan_node

    plan = plan_node(options)
    if options["check"]:
        return
    run_planned_node(plan)


@cli.command()
@click.argument("run_dirs", nargs=-1, required=True, metavar="RUN_DIR [RUN_DIR_B]")
def report(run_dirs: tuple[str, ...]) -> None:
    """Print a run's memory per round, or two runs side by side (B - A)."""
    from fedgpu.monitor.report import report_text
    from fedgpu.plans.report import plan_report

    click.echo(report_text(plan_report(run_dirs, warn=lambda line: click.echo(f"fedgpu: warning: {line}", err=True))))


@cli.command("bench-models")
@click.option("--models", default=None,
              help="Comma-separated torchvision model names (and vit_tiny_16, vit_small_16) [default: a zoo of ten].")
@click.option("--batches", type=positive, default=5, show_default=True,
              help="Timed batches per model, for training and for finetuning each.")
@click.option("--batch-size", type=click.IntRange(min=2), default=32, show_default=True)
@click.option("--image-size", type=click.IntRange(min=32), default=224, show_default=True,
              help="Side of the synthetic square images (ViTs need a multiple of 16).")
@click.option("--device", default="auto", show_default=True,
              help="auto (a GPU with room, else cpu), cpu, cuda or cuda:N.")
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="torch CPU threads (0: torch's default).")
@click.option("--timeout", type=seconds, default=1800.0, show_default=True, help="Seconds one model may take.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), default=None,
              help="Where to write the CSV [default: runs/bench-models-<timestamp>.csv].")
@placement_options
def bench_models(**options: Any) -> None:
    """Time K train and K head-only finetune batches per vision model, each in its own child."""
    from fedgpu.bench_models import run_bench_models
    from fedgpu.plans.bench_models import plan_bench_models

    sys.exit(run_bench_models(plan_bench_models(options), click.echo))


@cli.command()
@click.option("--dir", "directory", required=True, type=click.Path(file_okay=False),
              help="A private directory of yours for its socket and key (created 0700 if missing), e.g. \"$(mktemp "
                   "-d)\".")
@click.option("--task", "tasks", multiple=True,
              help="Task to warm up for (repeatable) [default: digits, unless --app].")
@click.option("--app", "app_dir", type=click.Path(), default=None,
              help="A Flower app directory: warm up with its ClientApp module.")
@click.option("--run-data", default=None, metavar="JSON",
              help='A run\'s task data to load once for every child: {"task": T, "options": {...}, "partitions": N}.')
@click.option("--parent-pid", type=int, default=None, help="Exit when this process dies.")
def zygote(
    directory: str, tasks: tuple[str, ...], app_dir: str | None, run_data: str | None, parent_pid: int | None
) -> None:
    """Serve this host's client nodes: fork each message's child from one warm process."""
    from fedgpu.flower.zygote_command import exec_zygote
    from fedgpu.plans.zygote import plan_zygote

    exec_zygote(plan_zygote(directory, tasks, app_dir, parent_pid, run_data=run_data))


_GIVEN = (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)


def forward_options(command: click.Command, values: dict[str, Any]) -> list[str]:
    """``values`` as ``command``'s own arguments: each option defined once, here, and passed on as it is."""
    argv: list[str] = []
    for param in command.params:
        if not isinstance(param, click.Option) or param.name not in values:
            continue
        value = values[param.name]
        if value is None or value == () or (param.is_flag and not param.secondary_opts and not value):
            continue
        if param.is_flag:
            argv.append(param.opts[0] if value else param.secondary_opts[0])
        elif param.multiple:
            for item in value:
                argv += [param.opts[0], str(item)]
        else:
            argv += [param.opts[0], str(value)]
    return argv


def _prog() -> str:
    return os.environ.get(PROG_ENV) or "fedgpu"


def _usage_line(err: click.ClickException) -> str:
    """One line for a usage error, in the words of the launcher that was called."""
    if isinstance(err, click.NoSuchOption):
        command = err.ctx.info_name if err.ctx else ""
        helper = "./run.sh --help" if _prog() == "run.sh" else f"{_prog()} {command} --help"
        return f"unknown option {err.option_name} (see {' '.join(helper.split())})"
    if isinstance(err, click.BadOptionUsage) and "requires an argument" in err.format_message():
        return f"option {err.option_name} needs a value"
    return err.format_message().replace("\n", " ")


def _exit_on_signal(signum: int, _frame: object) -> None:
    sys.exit(128 + signum)


def main(argv: list[str] | None = None) -> None:
    # A launcher stopped while it reads its options exits as it would later: 128 + the signal.
    if (argv if argv is not None else sys.argv[1:])[:1] == ["run"]:
        import signal

        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, _exit_on_signal)
    prog = _prog()
    prefix = f"{prog}: " if prog != "fedgpu" else "fedgpu: error: "
    try:
        cli.main(args=argv, prog_name="fedgpu", standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except BadInput as err:
        click.echo(f"{prefix}{err}", err=True)
        sys.exit(EXIT_USAGE)
    except click.ClickException as err:
        click.echo(f"{prefix}{_usage_line(err)}", err=True)
        sys.exit(EXIT_USAGE if isinstance(err, click.UsageError) else 1)


if __name__ == "__main__":
    main()
