"""The fedgpu ServerApp: FedAvg with exact sampling and central evaluation.

The ServerApp process is long-lived for the run, so its own torch work (the
initial weights, evaluating the global model each round) runs in isolated
children too; this process handles only NumPy arrays and Flower records.
"""

from __future__ import annotations

from logging import ERROR, INFO
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from fedgpu.flower.checks import CheckedStrategy
from fedgpu.flower.children import run_child, wants_placement
from fedgpu.flower.recorder import RunRecorder
from fedgpu.flower.records import named_record
from fedgpu.flower.settings import RunSettings
from fedgpu.flower.strategy import ExactFedAvg, TooFewNodes
from fedgpu.flower.warm_ups import zygote_warm_ups
from fedgpu.isolation import IsolationError, Isolator
from fedgpu.names import RUN_FAILED_MARK
from fedgpu.nvml.placement import GpuPlacer, PlacementSettings
from fedgpu.output import OutputError
from fedgpu.tasks.work import evaluate_global, initial_model

app = ServerApp()

@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = RunSettings.from_run_config(dict(context.run_config))
    try:
        recorder = RunRecorder(settings.run_dir, settings.to_run_config(), run_id=context.run_id)
    except OutputError as err:
        log(ERROR, "%s%s", RUN_FAILED_MARK, err)
        raise
    try:
        arrays = _federate(grid, settings, recorder)
        recorder.finish(arrays)
    except BaseException as err:
        kind, detail, more = _failure_of(err, Path(settings.run_dir) / "serverapp.log")
        recorder.fail(kind, detail, **more)
        # One line on the launcher's console (it shows "[fedgpu] " lines), the traceback in serverapp.log.
        log(ERROR, "%s%s", RUN_FAILED_MARK, detail)
        raise


def _failure_of(err: BaseException, log_file: Path) -> tuple[str, str, dict[str, Any]]:
    """(kind, one line, more fields) of what ended the run, for report.json."""
    if isinstance(err, TooFewNodes):
        return "too few nodes", str(err), {"exit_code": err.exit_code}
    if isinstance(err, OutputError):
        return "output", str(err), {"path": err.path}
    if isinstance(err, (KeyboardInterrupt, SystemExit)):
        return "stopped", f"stopped by {type(err).__name__}", {}
    if isinstance(err, IsolationError):  # the server's own evaluation, in its child
        return "ServerApp raised", f"the ServerApp's child {err.reason} (traceback in {log_file})", {}
    first = str(err).splitlines()[0] if str(err) else ""
    return "ServerApp raised", f"the ServerApp raised {type(err).__name__}: {first} (traceback in {log_file})", {}


def _federate(grid: Grid, settings: RunSettings, recorder: RunRecorder) -> ArrayRecord | None:
    """Every round; the final global model."""
    work = settings.work()
    # Evaluation children are placed like the client nodes' (same settings, same host ledger).
    placer = None
    if settings.isolation != "none" and wants_placement(settings.device):
        placer = GpuPlacer.from_settings(PlacementSettings.from_env(), log=lambda line: log(INFO, "[fedgpu] %s", line))
    try:
        # A launcher's shared zygote ($FEDGPU_ZYGOTE) serves us too; else a private one.
        with Isolator(settings.isolation, warm_ups=zygote_warm_ups(settings.task)) as isolator:

            def in_child(fn: Any, args: tuple, server_round: int, message: str) -> Any:
                who = {"client": "", "round": server_round, "message": message}
                key = f"{settings.task}/{message}"
                outcome, _ = run_child(isolator, placer, fn, args, key=key, who=who, role="server-child",
                                       run_dir=settings.run_dir)
                return outcome

            def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
                outcome = in_child(evaluate_global, (work, arrays.to_numpy_ndarrays()), server_round, "server-evaluate")
                recorder.server_evaluated(server_round, outcome.value, outcome.seconds)
                return MetricRecord({"loss": outcome.value["loss"], "accuracy": outcome.value["accuracy"]})

            arrays, task_defaults = in_child(initial_model, (work,), 0, "initial").value
            recorder.resolve_defaults(task_defaults)
            initial = named_record(arrays)
            strategy = CheckedStrategy(ExactFedAvg(settings, recorder))
            result = strategy.start(
                # Flower's own grid, paced where fedgpu runs it: a SuperLink's (fedgpu.flower.internals.pace_grid)
                # or a simulation's (fedgpu.flower.internals.simulation): one reply pace for every ServerApp.
                grid=grid,
                initial_arrays=initial,
                num_rounds=settings.num_rounds,
                timeout=settings.message_timeout,
                train_config=ConfigRecord(),
                evaluate_fn=evaluate,
            )
            return result.arrays
    finally:
        if placer is not None:
            placer.close()
