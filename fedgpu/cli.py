"""The ``fedgpu`` command: ``server``, ``client`` and ``zygote``.

Bad input is one line on stderr and exit code 2, before anything starts.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

import click

from fedgpu.flower.settings import ISOLATION_MODES, RunSettings, parse_task_options

EXIT_USAGE = 2

# Quiet and predictable Flower processes everywhere below us.
_FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


class UsageFailure(click.UsageError):
    """Bad input found after click's own parsing."""


def _fail(message: str) -> None:
    raise UsageFailure(message)


def _check_task(task: str) -> None:
    from fedgpu.tasks import UnknownTaskError, resolve_task

    try:
        resolve_task(task)
    except UnknownTaskError as err:
        _fail(str(err))


def _absolute(path: object) -> str | None:
    return str(Path(str(path)).absolute()) if path else None


def parse_node_config(text: str) -> dict[str, object]:
    """Flower's node config syntax, strictly: space-separated key=value, values
    TOML (bool, int, float, "string"). Flower's own parser drops what it cannot read."""
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


def _check_zygote(directory: str, ready_timeout: float = 300.0) -> None:
    """The shared zygote exists, is ours and proves it (waiting for it to be ready); else exit 2."""
    from fedgpu.isolation.zygote import ZygoteError, ZygoteLauncher

    if not os.path.lexists(directory):
        _fail(f"--zygote {directory}: no such directory (start `fedgpu zygote --dir {directory}` first)")
    try:
        ZygoteLauncher(directory).check(ready_timeout)
    except ZygoteError as err:
        _fail(f"--zygote {directory}: {err}")


def _watch_parent(parent_pid: int | None) -> None:
    if parent_pid is None:
        return
    from fedgpu.isolation.procs import die_with_parent

    die_with_parent(parent_pid, signal.SIGTERM)


positive = click.IntRange(min=1)


def placement_options(command):  # type: ignore[no-untyped-def]
    """GPU placement and admission control, the same for nodes and the server's evaluation."""
    from fedgpu.nvml.placement import ENV_ESTIMATE, ENV_GPUS, ENV_POLICY, ENV_TIMEOUT, POLICIES

    options = [
        click.option("--gpus", envvar=ENV_GPUS, default=None, help="GPU indices children may use, e.g. 0,2 [default: every GPU visible]."),
        click.option("--placement", envvar=ENV_POLICY, type=click.Choice(POLICIES), default="free", show_default=True, help="The GPU with most free memory, or round-robin among those with room."),
        click.option("--gpu-mem", envvar=ENV_ESTIMATE, type=click.FloatRange(min=0, min_open=True), default=None, help="A child's estimated peak GPU memory in MiB until one has been measured [default: 1024]."),
        click.option("--admission-timeout", envvar=ENV_TIMEOUT, type=click.FloatRange(min=0, min_open=True), default=600.0, show_default=True, help="Seconds a child may wait for GPU memory before its message fails."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _placement_settings(options: dict):  # type: ignore[no-untyped-def]
    """PlacementSettings from the CLI options (popped), or a one-line usage error."""
    from fedgpu.nvml.placement import PlacementSettings, parse_gpus

    gpus = options.pop("gpus")
    try:
        parsed = parse_gpus(str(gpus)) if gpus is not None else None
    except ValueError as err:
        _fail(str(err))
    return PlacementSettings(
        gpus=parsed, policy=str(options.pop("placement")), estimate_mib=options.pop("gpu_mem"),  # type: ignore[arg-type]
        admission_timeout=float(options.pop("admission_timeout")),  # type: ignore[arg-type]
    )


def _open_placer(settings, *, quiet: bool = False):  # type: ignore[no-untyped-def]
    """The host's GPU placer (None without a GPU); bad settings are a usage error."""
    from fedgpu.nvml.placement import GpuPlacer, PlacementError

    def log(line: str) -> None:
        if not quiet:
            click.echo(f"[fedgpu] {line}", err=True)

    try:
        return GpuPlacer.from_settings(settings, log=log)
    except PlacementError as err:
        _fail(str(err))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Flower federations whose clients hold GPU memory only while they train."""
    for key, value in _FLOWER_ENV.items():
        os.environ.setdefault(key, value)
    # Flower starts its own helpers (flower-superexec, flwr-serverapp) by name:
    # make those of the environment running us win, whatever PATH the caller had.
    bin_dir = os.path.dirname(sys.executable)
    os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")


@cli.command()
@click.option("--rounds", type=positive, default=3, show_default=True, help="Federated rounds.")
@click.option("--min-clients", type=positive, default=2, show_default=True, help="Clients connected before round 1.")
@click.option("--sampled", type=positive, default=2, show_default=True, help="Clients that train in each round.")
@click.option("--eval-sampled", type=click.IntRange(min=0), default=0, show_default=True, help="Clients that evaluate in each round.")
@click.option("--task", default="digits", show_default=True, help="Task name or package.module:TaskClass.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the SuperLink listens on.")
@click.option("--port", type=click.IntRange(1, 65535), default=9092, show_default=True, help="SuperLink port (Fleet, Control, Runtime APIs).")
@click.option("--run-dir", type=click.Path(file_okay=False), default=None, help="Output directory [default: runs/<timestamp>].")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=RunSettings.lr, show_default=True)
@click.option("--lr-decay", type=click.FloatRange(min=0, min_open=True), default=RunSettings.lr_decay, show_default=True, help="lr of round r = lr * decay^(r-1).")
@click.option("--local-epochs", type=positive, default=RunSettings.local_epochs, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=0), default=RunSettings.batch_size, show_default=True, help="0: the task's default.")
@click.option("--partitioner", type=click.Choice(["iid", "dirichlet"]), default="iid", show_default=True)
@click.option("--alpha", type=click.FloatRange(min=0, min_open=True), default=RunSettings.alpha, show_default=True, help="Dirichlet concentration.")
@click.option("--seed", type=int, default=RunSettings.seed, show_default=True)
@click.option("--data-files", default="", help="Local dataset files for tasks that would download (e.g. cifar10).")
@click.option("--task-option", "task_options", multiple=True, metavar="KEY=VALUE", help="A task's own option, e.g. weights=none or partitions=20 (repeatable).")
@click.option("--isolation", type=click.Choice(ISOLATION_MODES), default="zygote", show_default=True, help="How the server's own torch work runs.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--threads", type=click.IntRange(min=0), default=1, show_default=True, help="torch CPU threads per child (0: torch's default).")
@click.option("--message-timeout", type=click.FloatRange(min=0, min_open=True), default=RunSettings.message_timeout, show_default=True, help="Seconds a round waits for replies; a message's child may run as long.")
@click.option("--start-timeout", type=click.FloatRange(min=0, min_open=True), default=RunSettings.start_timeout, show_default=True, help="Seconds a round waits for enough client nodes before the run fails (exit 3).")
@click.option("--parent-pid", type=int, default=None, help="Exit when this process dies.")
@click.option("--check", is_flag=True, help="Only check the options (task, data, GPUs, port) and exit 0; start nothing.")
@click.option("--ssl-ca-certfile", type=click.Path(exists=True, dir_okay=False), default=None, help="TLS: the CA certificate (with --ssl-certfile and --ssl-keyfile; see launchers/make-certs.sh).")
@click.option("--ssl-certfile", type=click.Path(exists=True, dir_okay=False), default=None, help="TLS: the SuperLink's certificate.")
@click.option("--ssl-keyfile", type=click.Path(exists=True, dir_okay=False), default=None, help="TLS: the SuperLink certificate's private key.")
@click.option("--auth-public-keys", type=click.Path(exists=True), default=None, help="SuperNode authentication: a public key, or a directory of *.pub; only those nodes may join (needs TLS).")
@placement_options
def server(**options: object) -> None:
    """Run a SuperLink and the fedgpu ServerApp until the run ends."""
    _watch_parent(options.pop("parent_pid"))  # type: ignore[arg-type]
    check_only = bool(options.pop("check"))
    tls, auth_keys = _server_security(options)
    _check_task(str(options["task"]))
    try:
        options["task_options_json"] = json.dumps(parse_task_options(options.pop("task_options")))  # type: ignore[arg-type]
    except ValueError as err:
        _fail(str(err))
    placement = _placement_settings(options)
    checked = _open_placer(placement, quiet=True)  # the ServerApp opens its own: this one only checks the settings
    if checked is not None:
        checked.close()
    os.environ.update(placement.to_env())  # for the ServerApp's evaluation children
    host, port = str(options.pop("host")), int(options.pop("port"))  # type: ignore[call-overload]
    from fedgpu.flower.node import port_free

    if not port_free(port, host):
        _fail(f"port {port} on {host} is in use")
    run_dir = Path(options.pop("run_dir") or Path("runs") / time.strftime("%Y%m%d-%H%M%S")).absolute()  # type: ignore[operator]
    options["num_rounds"] = options.pop("rounds")
    from fedgpu.tasks import data_problem

    problem = data_problem(str(options["task"]), RunSettings(**options).task_options())  # type: ignore[arg-type]
    if problem:
        _fail(problem)
    if check_only:
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir):
            pass
    except OSError as err:
        _fail(f"run directory {run_dir} is not writable: {err.strerror or err}")
    run = RunSettings(run_dir=str(run_dir), **options)  # type: ignore[arg-type]
    from fedgpu.flower.server import ServerSettings, run_federation

    settings = ServerSettings(host=host, port=port, tls=tls, auth_public_keys=auth_keys)
    sys.exit(run_federation(run, settings, click.echo))


def _server_security(options: dict):  # type: ignore[no-untyped-def]
    """(TlsFiles or None, public key paths) from the server's options (popped)."""
    from fedgpu.flower.server import TlsFiles

    files = [options.pop(name) for name in ("ssl_ca_certfile", "ssl_certfile", "ssl_keyfile")]
    keys_path = options.pop("auth_public_keys")
    if any(files) and not all(files):
        _fail("TLS needs all three of --ssl-ca-certfile, --ssl-certfile and --ssl-keyfile")
    tls = TlsFiles(*(str(Path(f).absolute()) for f in files)) if all(files) else None
    keys: tuple[str, ...] = ()
    if keys_path:
        if tls is None:
            _fail("--auth-public-keys needs TLS (--ssl-ca-certfile, --ssl-certfile, --ssl-keyfile)")
        path = Path(str(keys_path)).absolute()
        keys = tuple(str(key) for key in sorted(path.glob("*.pub"))) if path.is_dir() else (str(path),)
        if not keys:
            _fail(f"--auth-public-keys {keys_path}: no *.pub file there")
    return tls, keys


@cli.command()
@click.argument("run_dirs", nargs=-1, required=True, metavar="RUN_DIR [RUN_DIR_B]")
def report(run_dirs: tuple[str, ...]) -> None:
    """Print a run's memory per round, or two runs side by side (B - A)."""
    from fedgpu.monitor.memory import TIMELINE_FILE
    from fedgpu.monitor.report import one_run, two_runs
    from fedgpu.monitor.summary import SUMMARY_FILE, load_summary_checked

    if len(run_dirs) > 2:
        _fail(f"report takes one or two run directories, got {len(run_dirs)}")
    summaries = []
    for run_dir in run_dirs:
        if not any((Path(run_dir) / name).is_file() for name in (SUMMARY_FILE, TIMELINE_FILE)):
            _fail(f"{run_dir}: not a run directory (no {SUMMARY_FILE} or {TIMELINE_FILE})")
        summary, problems = load_summary_checked(run_dir)
        if summary is None:
            _fail(f"{run_dir}: nothing to report: {'; '.join(problems)}")
        for problem in problems:
            click.echo(f"fedgpu: warning: {run_dir}: {problem}", err=True)
        summaries.append(summary)
    if len(run_dirs) == 1:
        click.echo(one_run(run_dirs[0], summaries[0]))
    else:
        click.echo(two_runs(run_dirs[0], summaries[0], run_dirs[1], summaries[1]))


@cli.command()
@click.option("--superlink", required=True, help="SuperLink address HOST:PORT.")
@click.option("--partition-id", type=click.IntRange(min=0), required=True)
@click.option("--num-partitions", type=positive, required=True)
@click.option("--mp/--no-mp", default=False, help="Run each message in a short-lived child (--mp) or in this process.")
@click.option("--isolation", type=click.Choice([m for m in ISOLATION_MODES if m != "none"]), default="zygote", show_default=True, help="Child mode with --mp.")
@click.option("--zygote", "zygote_dir", envvar="FEDGPU_ZYGOTE", type=click.Path(), default=None, help="Directory of the host's shared zygote (`fedgpu zygote`) [default: $FEDGPU_ZYGOTE, else a private one].")
@click.option("--task", default=None, help="Refuse runs of any other task.")
@click.option("--node-config", default="", help='More node config for your ClientApp, Flower\'s syntax: \'key=1 name="x"\'.')
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None, help="Seconds a message may run before its child is killed.")
@click.option("--runtime-port", type=click.IntRange(1, 65535), default=None, help="Port of this node's Runtime API on 127.0.0.1 [default: a free one].")
@click.option("--max-wait-time", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True, help="Seconds without the SuperLink before giving up: at start, exit 2; once running, exit 3.")
@click.option("--parent-pid", type=int, default=None, help="Exit when this process dies.")
@click.option("--root-certificates", type=click.Path(exists=True, dir_okay=False), default=None, help="TLS: the CA certificate the SuperLink's certificate is checked against [default: insecure].")
@click.option("--auth-private-key", type=click.Path(exists=True, dir_okay=False), default=None, help="SuperNode authentication: this node's private key (its public key registered with the server; needs TLS).")
@click.option("--check", is_flag=True, help="Only check the options and exit 0; connect to nothing.")
@placement_options
def client(**options: object) -> None:
    """Run a long-lived client node; with --mp each message runs in a child."""
    _watch_parent(options["parent_pid"])  # type: ignore[arg-type]
    if options["auth_private_key"] and not options["root_certificates"]:
        _fail("--auth-private-key needs TLS (--root-certificates)")
    if options["gpus"] is not None and not options["mp"]:
        _fail("--gpus needs --mp: without it the node itself holds the GPU it first used")
    placement = _placement_settings(options)
    if int(options["partition_id"]) >= int(options["num_partitions"]):  # type: ignore[call-overload]
        _fail(f"--partition-id {options['partition_id']} must be below --num-partitions {options['num_partitions']}")
    superlink = str(options["superlink"])
    host, _, port = superlink.rpartition(":")
    if not host or not port.isdigit():
        _fail(f"--superlink {superlink!r} is not HOST:PORT")
    node_config: dict[str, object] = {
        "partition-id": options["partition_id"],
        "num-partitions": options["num_partitions"],
    }
    if options["task"]:
        _check_task(str(options["task"]))
        node_config["task"] = options["task"]
    try:
        extra = parse_node_config(str(options["node_config"]))
    except ValueError as err:
        _fail(f"--node-config: {err}")
    taken = sorted(set(extra) & {"partition-id", "num-partitions", "task"})
    if taken:
        _fail(f"--node-config: {', '.join(taken)} come from their own options")
    node_config.update(extra)
    if options["check"]:
        if options["mp"]:
            checked = _open_placer(placement, quiet=True)
            if checked is not None:
                checked.close()
        return
    zygote_dir = options["zygote_dir"]
    if zygote_dir and options["mp"] and options["isolation"] == "zygote":
        _check_zygote(str(zygote_dir))
    from fedgpu.flower.node import superlink_reachable

    patience = float(options["max_wait_time"])  # type: ignore[arg-type]
    deadline = time.monotonic() + patience
    while why := superlink_reachable(superlink):
        if time.monotonic() >= deadline:
            _fail(f"cannot reach the SuperLink at {superlink} within {patience:g} s: {why}")
        time.sleep(0.5)
    # A private Flower home: nodes on one host must not install FABs into the same directory at once.
    flwr_home = tempfile.mkdtemp(prefix="fedgpu-node-")
    os.environ["FLWR_HOME"] = flwr_home
    from fedgpu.flower.node import NodeSettings, run_client_node

    settings = NodeSettings(
        superlink=superlink,
        node_config=node_config,
        isolation=str(options["isolation"]) if options["mp"] else "none",
        zygote=zygote_dir,
        timeout=options["timeout"],  # type: ignore[arg-type]
        runtime_port=options["runtime_port"],  # type: ignore[arg-type]
        max_wait_time=options["max_wait_time"],  # type: ignore[arg-type]
        root_certificates=_absolute(options["root_certificates"]),
        auth_private_key=_absolute(options["auth_private_key"]),
    )
    # Only children are placed: without --mp the node itself would hold the GPU.
    placer = _open_placer(placement) if options["mp"] else None
    try:
        run_client_node(settings, placer)
    finally:
        import shutil

        shutil.rmtree(flwr_home, ignore_errors=True)


@cli.command("bench-models")
@click.option("--models", default=None, help="Comma-separated torchvision model names (and vit_tiny_16, vit_small_16) [default: a zoo of ten].")
@click.option("--batches", type=positive, default=5, show_default=True, help="Timed batches per model, for training and for finetuning each.")
@click.option("--batch-size", type=click.IntRange(min=2), default=32, show_default=True)
@click.option("--image-size", type=click.IntRange(min=32), default=224, show_default=True, help="Side of the synthetic square images (ViTs need a multiple of 16).")
@click.option("--device", default="auto", show_default=True, help="auto (a GPU with room, else cpu), cpu, cuda or cuda:N.")
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True, help="torch CPU threads (0: torch's default).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=1800.0, show_default=True, help="Seconds one model may take.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), default=None, help="Where to write the CSV [default: runs/bench-models-<timestamp>.csv].")
@placement_options
def bench_models(**options: object) -> None:
    """Time K train and K head-only finetune batches per vision model, each in its own child."""
    from fedgpu.bench_models import BenchSettings, check_models, measure_all, print_table, write_csv
    from fedgpu.isolation import Isolator
    from fedgpu.nvml.placement import GpuPlacer
    from fedgpu.zoo import DEFAULT_MODELS

    models = tuple(m.strip() for m in str(options.pop("models") or ",".join(DEFAULT_MODELS)).split(",") if m.strip())
    if not models:
        _fail("--models: no model named")
    device = str(options.pop("device"))
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        _fail(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    image_size = int(options.pop("image_size"))  # type: ignore[call-overload]
    if any(m.startswith("vit_") for m in models) and image_size % 16:
        _fail(f"--image-size {image_size}: ViT models need a multiple of 16")
    csv_path = str(options.pop("csv_path") or Path("runs") / time.strftime("bench-models-%Y%m%d-%H%M%S.csv"))
    if Path(csv_path).is_dir():
        _fail(f"--csv {csv_path}: is a directory")
    csv_dir = Path(csv_path).absolute().parent
    try:  # a file created and removed there, as the CSV will be written at the end
        csv_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=csv_dir):
            pass
    except OSError as err:
        _fail(f"--csv {csv_path}: not writable: {err.strerror or err}")
    placement = _placement_settings(options)
    settings = BenchSettings(models, int(options["batches"]), int(options["batch_size"]), image_size,  # type: ignore[call-overload]
                             device=device, threads=int(options["threads"]), timeout=float(options["timeout"]))  # type: ignore[call-overload]
    with Isolator("spawn") as isolator:
        unknown = check_models(isolator, models)
        if unknown:
            _fail(f"--models: unknown model(s) {', '.join(unknown)} (torchvision names, or vit_tiny_16, vit_small_16)")
        placer: GpuPlacer | None = _open_placer(placement) if device in ("auto", "cuda") else None
        click.echo(f"[fedgpu] {len(models)} model(s) on {'a placed GPU' if placer else device}; CSV: {csv_path}", err=True)
        rows = measure_all(settings, isolator, placer,
                           on_row=lambda row: click.echo(f"[fedgpu] {row['model']}: {'failed' if row.get('error') else 'done'}", err=True))
    if placer is not None:
        placer.close()
    write_csv(csv_path, rows)
    print_table(rows, sys.stdout)
    sys.exit(1 if any(row.get("error") for row in rows) else 0)


@cli.command()
@click.option("--dir", "directory", required=True, type=click.Path(file_okay=False), help="Private directory for its socket and key (created 0700 if missing).")
@click.option("--task", "tasks", multiple=True, help="Task to warm up for (repeatable) [default: digits].")
@click.option("--parent-pid", type=int, default=None, help="Exit when this process dies.")
def zygote(directory: str, tasks: tuple[str, ...], parent_pid: int | None) -> None:
    """Serve this host's client nodes: fork each message's child from one warm process."""
    _watch_parent(parent_pid)
    tasks = tasks or ("digits",)
    for task in tasks:
        _check_task(task)
    from fedgpu.flower.settings import zygote_warm_ups
    from fedgpu.isolation.procs import pythonpath_with_package
    from fedgpu.isolation.zygote import ZygoteError
    from fedgpu.isolation.zygote.server import SINGLE_THREADED_ENV, prepare_directory

    try:  # the zygote checks again; here a bad path is one line before anything is imported
        prepare_directory(directory)
    except ZygoteError as err:
        _fail(f"--dir {directory}: {err}")

    # This process has loaded flwr and numpy (and their thread pools) already:
    # become a fresh interpreter, same pid, with single-threaded libraries.
    parent = ["--parent-pid", str(parent_pid)] if parent_pid else []
    argv = [sys.executable, "-m", "fedgpu.isolation.zygote", "--dir", directory, *parent, *zygote_warm_ups(*tasks)]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, {**SINGLE_THREADED_ENV, **os.environ, "PYTHONPATH": pythonpath_with_package()})


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="fedgpu", standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as err:
        message = err.format_message().replace("\n", " ")
        click.echo(f"fedgpu: error: {message}", err=True)
        sys.exit(EXIT_USAGE if isinstance(err, click.UsageError) else 1)


if __name__ == "__main__":
    main()
