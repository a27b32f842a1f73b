"""The fedgpu ServerApp: FedAvg with exact sampling and central evaluation.

The ServerApp process is long-lived for the run, so its own torch work (the
initial weights, evaluating the global model each round) runs in isolated
children too; this process handles only NumPy arrays and Flower records.
"""

from __future__ import annotations

import time
from logging import INFO
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from fedgpu.flower.children import run_child, wants_placement
from fedgpu.flower.recorder import RunRecorder
from fedgpu.flower.settings import RunSettings, zygote_warm_ups
from fedgpu.flower.strategy import ExactFedAvg
from fedgpu.isolation import Isolator
from fedgpu.nvml.placement import GpuPlacer, PlacementSettings
from fedgpu.tasks.work import evaluate_global, initial_arrays

app = ServerApp()

REPLY_POLL_SECONDS = 0.2


class PromptGrid:
    """The run's Grid, polling for replies every 0.2 s instead of Flower's fixed 3 s.

    Flower's ``send_and_receive`` sleeps 3 s between pulls, which on average
    adds 1.5 s to every round's train phase; this one is the same loop over
    the Grid's public ``push_messages`` / ``pull_messages``. Everything else is
    delegated to the wrapped Grid.
    """

    def __init__(self, grid: Grid, interval: float = REPLY_POLL_SECONDS) -> None:
        self._grid = grid
        self._interval = interval

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        waiting = set(self._grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while waiting and (deadline is None or time.monotonic() < deadline):
            pulled = list(self._grid.pull_messages(waiting))
            replies.extend(pulled)
            waiting.difference_update(reply.metadata.reply_to_message_id for reply in pulled)
            if waiting:
                time.sleep(self._interval)
        return replies


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = RunSettings.from_run_config(dict(context.run_config))
    recorder = RunRecorder(settings.run_dir, settings.to_run_config(), run_id=context.run_id)
    work = settings.work()
    arrays = None
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
                outcome, _ = run_child(isolator, placer, fn, args, key=key, who=who, role="server-child", run_dir=settings.run_dir)
                return outcome

            def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
                outcome = in_child(evaluate_global, (work, arrays.to_numpy_ndarrays()), server_round, "server-evaluate")
                recorder.server_evaluated(server_round, outcome.value, outcome.seconds)
                return MetricRecord({"loss": outcome.value["loss"], "accuracy": outcome.value["accuracy"]})

            initial = ArrayRecord(in_child(initial_arrays, (work,), 0, "initial").value)
            result = ExactFedAvg(settings, recorder).start(
                grid=PromptGrid(grid),  # type: ignore[arg-type]
                initial_arrays=initial,
                num_rounds=settings.num_rounds,
                timeout=settings.message_timeout,
                train_config=ConfigRecord(),
                evaluate_fn=evaluate,
            )
            arrays = result.arrays
    except BaseException:
        recorder.finish(arrays, status="failed")
        raise
    finally:
        if placer is not None:
            placer.close()
    recorder.finish(arrays)
