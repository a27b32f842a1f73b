"""The fedgpu ServerApp: FedAvg with exact sampling and central evaluation.

The ServerApp process is long-lived for the run, so its own torch work (the
initial weights, evaluating the global model each round) runs in isolated
children too; this process handles only NumPy arrays and Flower records.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedgpu.flower.recorder import RunRecorder
from fedgpu.flower.settings import RunSettings, zygote_warm_ups
from fedgpu.flower.strategy import ExactFedAvg
from fedgpu.isolation import Isolator
from fedgpu.tasks.work import evaluate_global, initial_arrays

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = RunSettings.from_run_config(dict(context.run_config))
    recorder = RunRecorder(settings.run_dir, settings.to_run_config(), run_id=context.run_id)
    work = settings.work()
    arrays = None
    try:
        # A launcher's shared zygote ($FEDGPU_ZYGOTE) serves us too; else a private one.
        with Isolator(settings.isolation, warm_ups=zygote_warm_ups(settings.task)) as isolator:

            def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
                outcome = isolator.run(evaluate_global, (work, arrays.to_numpy_ndarrays()))
                recorder.server_evaluated(server_round, outcome.value, outcome.seconds)
                return MetricRecord({"loss": outcome.value["loss"], "accuracy": outcome.value["accuracy"]})

            initial = ArrayRecord(isolator.run(initial_arrays, (work,)).value)
            result = ExactFedAvg(settings, recorder).start(
                grid=grid,
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
    recorder.finish(arrays)
