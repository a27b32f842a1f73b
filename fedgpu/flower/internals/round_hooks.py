"""A user's ServerApp, round by round: the hooks that feed ``fedgpu.flower.app_rounds`` (flwr 1.42).

Installed in a ServerApp process only (:func:`record_app_rounds`); they patch
Flower's ``ServerApp``, ``Strategy``, legacy ``DefaultWorkflow`` and ``History``
classes of that process, and every call into the recorder is guarded so that a
recording error is never the app's problem.
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Callable
from typing import Any

_app_rounds = None  # the AppRounds of the ServerApp running in this process


def app_rounds_contract() -> list[str]:
    """What differs in Flower's ServerApp, Strategy and DefaultWorkflow from what :func:`record_app_rounds` hooks."""
    from flwr.server.workflow import DefaultWorkflow
    from flwr.serverapp import ServerApp
    from flwr.serverapp.strategy import Result, Strategy

    problems = []
    for name, function, wanted in (
        ("ServerApp.__call__", ServerApp.__call__, ["self", "grid", "context"]),
        ("DefaultWorkflow.__call__", DefaultWorkflow.__call__, ["self", "grid", "context"]),
        ("Strategy.configure_train", Strategy.configure_train, ["self", "server_round", "arrays", "config", "grid"]),
        ("Strategy.aggregate_train", Strategy.aggregate_train, ["self", "server_round", "replies"]),
        ("Strategy.aggregate_evaluate", Strategy.aggregate_evaluate, ["self", "server_round", "replies"]),
    ):
        if list(inspect.signature(function).parameters) != wanted:
            problems.append(f"{name} no longer takes ({', '.join(wanted)})")
    start = list(inspect.signature(Strategy.start).parameters)
    if start[:4] != ["self", "grid", "initial_arrays", "num_rounds"] or "evaluate_fn" not in start:
        problems.append("Strategy.start no longer takes (grid, initial_arrays, num_rounds, ..., evaluate_fn)")
    if not {"arrays", "evaluate_metrics_serverapp"} <= set(getattr(Result, "__dataclass_fields__", {})):
        problems.append("Result has no arrays and evaluate_metrics_serverapp")
    return problems


def record_app_rounds(log: Callable[[str], None]) -> bool:
    """Hook Flower in this (ServerApp) process: a user's app gets metrics.csv, a line per round and model.npz.

    False (and why, logged) outside a fedgpu run, or where Flower is not the
    one hooked here: the app then runs without them. fedgpu's own ServerApp
    records its rounds itself and is left alone.
    """
    from fedgpu.names import RUN_DIR_ENV

    run_dir = os.environ.get(RUN_DIR_ENV)
    if not run_dir:
        return False
    import flwr
    from flwr.server import History
    from flwr.server.workflow import DefaultWorkflow
    from flwr.serverapp import ServerApp
    from flwr.serverapp.strategy import Strategy

    try:
        problems = app_rounds_contract()
        if not problems:
            _record_legacy_workflow(DefaultWorkflow, log)
            _record_legacy_history(History)
            _record_strategy(Strategy, log)
            _record_server_app(ServerApp, run_dir, log)  # last: the others do nothing without it
    except Exception as err:  # noqa: BLE001 - never the app's problem
        problems = [f"{type(err).__name__}: {err}"]
    if problems:
        log(f"flwr {flwr.__version__}: the ServerApp is not the one fedgpu records ({'; '.join(problems)}); "
            "no metrics.csv or round lines for this app")
        return False
    return True


def _tell(log: Callable[[str], None], what: Callable[..., Any], *args: Any) -> Any:
    """A call into the recorder: its own error is logged, never the app's problem."""
    try:
        return what(*args)
    except Exception as err:  # noqa: BLE001
        log(f"could not record the rounds ({getattr(what, '__name__', what)}: {type(err).__name__}: {err})")
        return None


def _record_server_app(server_app_class: type, run_dir: str, log: Callable[[str], None]) -> None:
    from fedgpu.flower.app_rounds import AppRounds

    call = server_app_class.__call__

    def call_and_record(self, grid, context):  # Flower's signature
        global _app_rounds
        ours = sys.modules.get("fedgpu.flower.server_app")
        if _app_rounds is not None or (ours is not None and self is getattr(ours, "app", None)):
            return call(self, grid, context)  # fedgpu's own ServerApp records its rounds itself
        planned = context.run_config.get("num-server-rounds")
        rounds = _app_rounds = AppRounds(run_dir, planned if isinstance(planned, int) else None)
        _watch_grid(grid, rounds, log)
        try:
            return call(self, grid, context)
        finally:  # the round that was running when the app returned, or raised, is still a row
            _tell(log, rounds.close)
            _app_rounds = None

    server_app_class.__call__ = call_and_record


def _watch_grid(grid: Any, rounds: Any, log: Callable[[str], None]) -> None:
    """Count every message the app pushes and every reply it pulls through this Grid."""
    from fedgpu.flower.app_rounds import server_round_of

    push, pull = grid.push_messages, grid.pull_messages

    def push_and_count(messages):  # Flower's signature
        messages = list(messages)
        numbers = [n for n in (server_round_of(m) for m in messages) if n is not None and n >= 1]
        if numbers:
            _tell(log, rounds.begin, max(numbers))  # before the push: the round's first message starts it
        ids = list(push(messages))
        _tell(log, rounds.pushed, messages, ids)
        return ids

    def pull_and_count(message_ids):
        replies = list(pull(message_ids))
        _tell(log, rounds.pulled, replies)
        return replies

    grid.push_messages, grid.pull_messages = push_and_count, pull_and_count


def _record_strategy(strategy_class: type, log: Callable[[str], None]) -> None:
    """``Strategy.start`` tells the recorder where rounds begin and what each aggregated; bad replies are named."""
    from fedgpu.flower.app_rounds import BAD_REPLY, client_of, diagnose_replies

    start = strategy_class.start
    signature = inspect.signature(start)

    def start_and_record(self, *args, **kwargs):
        rounds = _app_rounds
        if rounds is None or rounds.in_strategy:
            return start(self, *args, **kwargs)  # not a user's app, or a strategy started inside another's start
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        num_rounds, evaluate_fn = bound.arguments["num_rounds"], bound.arguments["evaluate_fn"]
        if isinstance(num_rounds, int):
            rounds.num_rounds = num_rounds
        model: dict[int, Any] = {}

        def configure_train(server_round, arrays, config, grid):
            _tell(log, rounds.begin, server_round)
            model[server_round] = arrays
            return strategy_call("configure_train", server_round, arrays, config, grid)

        def aggregate(kind: str, name: str, server_round: int, replies: Any) -> Any:
            replies = list(replies)
            try:
                return strategy_call(name, server_round, replies)
            except Exception as err:
                _tell(log, name_bad_replies, kind, name, server_round, replies, model.get(server_round), err)
                raise

        def aggregate_train(server_round, replies):
            arrays, metrics = aggregate("train", "aggregate_train", server_round, replies)
            _tell(log, rounds.aggregated, server_round, "train", metrics)
            return arrays, metrics

        def aggregate_evaluate(server_round, replies):
            metrics = aggregate("evaluate", "aggregate_evaluate", server_round, replies)
            _tell(log, rounds.aggregated, server_round, "evaluate", metrics)
            return metrics

        def evaluate_and_record(server_round, arrays):
            metrics = evaluate_fn(server_round, arrays)
            _tell(log, rounds.aggregated, server_round, "server", metrics)
            if server_round >= 1 and rounds.current is not None and rounds.current.number == server_round:
                _tell(log, rounds.end)  # the round's last step in Flower's loop
            return metrics

        def name_bad_replies(kind, name, server_round, replies, arrays, err):
            weighted_by = getattr(self, "weighted_by_key", "num-examples")
            bad = diagnose_replies(replies, arrays if kind == "train" else None, weighted_by)
            for reply, problem in bad:
                rounds.rejected(server_round, kind, reply, client_of(reply), problem)
            first = str(err).strip().splitlines()[0].strip() if str(err).strip() else ""
            detail = f"round {server_round}: {type(self).__name__}.{name} raised {type(err).__name__}: {first}"
            if bad:
                who = ", ".join(f"client {client_of(r)}" if client_of(r) else f"node {r.metadata.src_node_id}"
                                for r, _ in bad)
                detail += f" ({BAD_REPLY} from {who})"
            else:
                detail += " (fedgpu's reply check finds no reply wrong)"
            rounds.failed("aggregation failed", detail)
            rounds.say(f"[fedgpu] {detail}")

        hooked = ("configure_train", "aggregate_train", "aggregate_evaluate")
        originals = {name: getattr(self, name) for name in hooked}

        def strategy_call(name: str, *call_args: Any) -> Any:
            return originals[name](*call_args)

        ours = {"configure_train": configure_train, "aggregate_train": aggregate_train,
                "aggregate_evaluate": aggregate_evaluate}
        try:
            for name, function in ours.items():
                setattr(self, name, function)  # this call of start only; the class stays Flower's
        except (AttributeError, TypeError):  # a strategy with __slots__: rounds from the Grid alone
            ours = {}
        if evaluate_fn is not None:
            bound.arguments["evaluate_fn"] = evaluate_and_record
        rounds.in_strategy = True
        try:
            result = start(*bound.args, **bound.kwargs)
        finally:
            rounds.in_strategy = False
            for name in ours:
                self.__dict__.pop(name, None)
        _tell(log, rounds.end)
        _tell(log, rounds.model, getattr(result, "arrays", None))
        return result

    strategy_class.start = start_and_record


def _record_legacy_workflow(workflow_class: type, log: Callable[[str], None]) -> None:
    """A legacy ``DefaultWorkflow`` (SecAgg+ among them): its History gives each round's metrics."""
    from flwr.server.workflow.constant import MAIN_PARAMS_RECORD

    call = workflow_class.__call__

    def call_and_record(self, grid, context):  # Flower's signature
        rounds = _app_rounds
        if rounds is None:
            return call(self, grid, context)
        rounds.history = getattr(context, "history", None)
        planned = getattr(getattr(context, "config", None), "num_rounds", None)
        if isinstance(planned, int):
            rounds.num_rounds = planned
        evaluate_workflow = self.evaluate_workflow

        def evaluate_then_end(grid, context):  # Flower's Workflow
            evaluate_workflow(grid, context)
            _tell(log, rounds.end)  # a legacy round's last step: its History is complete

        self.evaluate_workflow = evaluate_then_end
        try:
            outcome = call(self, grid, context)
        finally:
            self.evaluate_workflow = evaluate_workflow
        _tell(log, rounds.end)
        _tell(log, rounds.model, context.state.array_records.get(MAIN_PARAMS_RECORD))
        return outcome

    workflow_class.__call__ = call_and_record


def _record_legacy_history(history_class: type) -> None:
    """A legacy ServerApp built with ``server_fn`` keeps its rounds' metrics in a History that Flower's
    ``Server.fit`` makes for itself: the first one made while a user's app runs is the one read."""
    make = history_class.__init__

    def make_and_record(self, *args, **kwargs):
        make(self, *args, **kwargs)
        rounds = _app_rounds
        if rounds is not None and rounds.history is None:
            rounds.history = self

    history_class.__init__ = make_and_record

