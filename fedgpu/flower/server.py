"""``fedgpu server``: a SuperLink, and a run submitted to it, watched to its end.

The SuperLink runs as our child; the run is submitted with ``flwr run``: an
app directory generated in the run directory for fedgpu's own tasks (its
ServerApp records every reply), or the user's own app directory. Its final
status is read back with ``flwr ls`` (``flwr run`` exits 0 even when the run
failed). The memory monitor samples throughout; the reports and the failure
summary are written at the end, whatever ended the run.
"""

from __future__ import annotations

import os
import secrets
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from fedgpu.flower.run_reports import (
    mark_ended,
    message_counts,
    read_report,
    record_runtime,
    write_app_report,
    write_memory_reports,
)
from fedgpu.flower.server_plan import ServerPlan
from fedgpu.flower.superlink import (
    COMPLETED,
    CONNECTION,
    Federation,
    ServerError,
    SimulatedFederation,
    last_error_lines,
    write_connection,
)
from fedgpu.names import (
    FLWR_HOME_ENV,
    RUN_FAILED_MARK,
    RUN_TOKEN_ENV,
)
from fedgpu.output import OutputError

SIMULATION_NODES_WAIT_SECONDS = 15.0  # a simulation's ServerApp waiting for more nodes than it has: exit 3 after this

# Exit codes of `fedgpu server` (and so of `fedgpu run`); docs/cli.md lists them (3: fedgpu.names.EXIT_TOO_FEW_NODES).
# Exit codes of `fedgpu server` (and so of `fedgpu run`); docs/cli.md lists them.
EXIT_FAILED = 1
EXIT_ALL_FAILED = 4  # the run completed, but every message it sent failed
EXIT_RUN_TIMEOUT = 5  # the run outlived --run-timeout


class RunStopped(BaseException):
    """Raised in the main thread to end a run early: the signal's exit code, or an output that failed.

    A BaseException, as KeyboardInterrupt is: a signal handler raises it wherever the main thread is, and no
    ``except Exception`` on the way (a question to the SuperLink that may fail) may take it for a failure.
    """

    def __init__(self, code: int, line: str = "") -> None:
        super().__init__(line)
        self.code, self.line = code, line


def run_federation(plan: ServerPlan, say: Callable[..., None]) -> int:
    """Start the SuperLink, submit the run, monitor memory, write the reports; the exit code.

    ``say(line, err=False)`` prints. 0 only when Flower says the run completed
    and not every message failed; the other codes are ``EXIT_*`` above, and
    128 + the signal that stopped the run. Every process started here is
    stopped before this returns, whatever ended the run.
    """
    from fedgpu.names import NODES_WAIT_ENV, PRIVATE_DIR_ENV, RUN_DIR_ENV
    from fedgpu.private_dirs import make_private_dir, remove, sweep_dead

    run_dir = plan.run_dir
    flwr_home = run_dir / "flwr-home"
    # Every process of the run carries this marker (the launcher sets it for
    # the client nodes too): the host-memory sampler finds them by it.
    os.environ.setdefault(RUN_DIR_ENV, str(run_dir))
    # Run alone (not under `fedgpu run`): this run's token and private directory are made here.
    os.environ.setdefault(RUN_TOKEN_ENV, secrets.token_hex(16))
    own_private_dir = None
    if not os.environ.get(PRIVATE_DIR_ENV):
        sweep_dead()
        own_private_dir = os.environ[PRIVATE_DIR_ENV] = make_private_dir("server")
    env = {**os.environ, FLWR_HOME_ENV: str(flwr_home)}
    if plan.run is None:  # a user's ServerApp: how long it may wait for more nodes than there are
        # A simulation's nodes are all there within seconds and no more come: waiting is over sooner.
        wait = plan.start_timeout if plan.simulation is None else min(plan.start_timeout, SIMULATION_NODES_WAIT_SECONDS)
        env[NODES_WAIT_ENV] = repr(wait)
    try:
        federation = SimulatedFederation(plan, env) if plan.simulation else Federation(plan, env)
        return _run_federation(plan, say, federation)
    except OSError as err:  # a write no layer below caught (a full disk): one line, not a traceback
        say(f"{RUN_FAILED_MARK}{OutputError(Path(err.filename or run_dir), err)}")
        return EXIT_FAILED
    finally:
        remove(own_private_dir)


def _run_federation(plan: ServerPlan, say: Callable[..., None], federation: Federation) -> int:
    from fedgpu.monitor.memory import MemoryMonitor
    from fedgpu.names import RUN_DIR_ENV
    from fedgpu.nvml.devices import open_nvml

    run_dir = plan.run_dir
    flwr_home = run_dir / "flwr-home"
    try:
        if plan.simulation is None:  # a simulation has no SuperLink to connect to
            write_connection(flwr_home, plan.server)
    except OutputError as err:
        say(f"{RUN_FAILED_MARK}{err}")
        return EXIT_FAILED
    except OSError as err:
        say(f"{RUN_FAILED_MARK}{OutputError(flwr_home, err)}")
        return EXIT_FAILED
    say(f"[fedgpu] run directory {run_dir}", err=True)
    if plan.simulation is None:  # a simulation has no SuperLink to ask
        say(f"[fedgpu] Flower's CLI: FLWR_HOME={flwr_home} flwr ls {CONNECTION} "
            f"(or: flwr log RUN_ID {CONNECTION} --show)")

    def stop(code: int, line: str = "") -> None:
        raise RunStopped(code, line)

    # TERM/INT unwind through `finally`, which stops the SuperLink's whole tree:
    # Flower starts its SuperExec in a new session, out of reach of group kills.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda received, _frame: stop(128 + received))
    # The monitor's thread cannot raise here; it signals, and the handler raises.
    signal.signal(signal.SIGUSR1, lambda _signum, _frame: stop(EXIT_FAILED, str(monitor.error)))
    signal.signal(signal.SIGALRM, lambda _signum, _frame: stop(
        EXIT_RUN_TIMEOUT, f"the run took longer than --run-timeout {plan.run_timeout:g} s; stopped"))
    nvml, no_gpu = open_nvml()
    if nvml is None:
        say(f"[fedgpu] no GPU to monitor ({no_gpu}): memory reports from host RSS", err=True)
    try:
        monitor = MemoryMonitor(str(run_dir), os.environ[RUN_DIR_ENV], nvml=nvml, no_gpu_reason=no_gpu,
                                on_error=lambda _error: os.kill(os.getpid(), signal.SIGUSR1)).start()
    except OutputError as err:
        say(f"{RUN_FAILED_MARK}{err}")
        return EXIT_FAILED
    status, code, failed_line, stopped_by = "unknown", EXIT_FAILED, "", ""
    try:
        federation.start_superlink()
        federation.register_nodes()
        if plan.simulation is None:
            say(f"[fedgpu] SuperLink ready on {plan.server.host}:{plan.server.port}", err=True)
        if plan.wait_nodes:
            # Every node registered before round 1: a strategy samples from the nodes it sees at that moment.
            federation.wait_for_nodes(plan.wait_nodes, plan.start_timeout)
            say(f"[fedgpu] all {plan.wait_nodes} client nodes registered; submitting the run", err=True)
        if plan.run_timeout is not None:
            signal.setitimer(signal.ITIMER_REAL, plan.run_timeout)
        status = federation.submit_and_wait(sys.stdout)
        code = 0 if status == COMPLETED else EXIT_FAILED
    except RunStopped as stopped:
        code, failed_line = stopped.code, stopped.line
        if code > 128:
            stopped_by = signal.Signals(code - 128).name
    except (ServerError, OutputError) as err:
        code, failed_line = getattr(err, "exit_code", EXIT_FAILED), str(err)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGALRM):
            signal.signal(signum, signal.SIG_IGN)  # the clean-up itself is not interrupted
        federation.close()
        monitor.stop()
    if stopped_by:
        status = "stopped"
        say(f"[fedgpu] {stopped_by} received: run stopped", err=True)
    elif code != 0 and failed_line:
        say(f"{RUN_FAILED_MARK}{failed_line}")  # on the console (stdout): server.log may be what cannot be written
    reason = ""
    if code == EXIT_FAILED and not failed_line and status != COMPLETED and not stopped_by:
        # The ServerApp failed without saying why on the console: its own last words.
        lines = last_error_lines(federation.tail)
        reason = " | ".join(line.strip() for line in lines)
        if lines and not any(RUN_FAILED_MARK in line for line in federation.tail):
            say(f"[fedgpu] the ServerApp failed: {reason} (see {run_dir / 'serverapp.log'})")
    if plan.run is None:
        write_app_report(plan, status, say, reason=failed_line or reason, stopped_by=stopped_by,
                          failure_kind="run failed" if failed_line else "ServerApp failed")
    elif stopped_by or failed_line:
        mark_ended(run_dir, say, stopped_by=stopped_by, reason=failed_line)
    record_runtime(plan)
    report = read_report(run_dir)
    failure = report.get("failure")
    if code == EXIT_FAILED and isinstance(failure, dict):
        code = int(failure.get("exit_code", EXIT_FAILED))
    try:
        write_memory_reports(run_dir, monitor, say)
    except OutputError as err:
        if str(err) != failed_line:  # the monitor's failure, said once
            say(f"{RUN_FAILED_MARK}{err}")
        code = code or EXIT_FAILED
    except Exception as err:  # noqa: BLE001 - the run's own result stands; say what the reports lack
        say(f"[fedgpu] could not write the memory reports: {err!r}", err=True)
    sent, failed = message_counts(report)
    if report:
        from fedgpu.flower.recorder import failure_summary

        say("\n".join(failure_summary(report, run_dir)))
    if code == 0 and sent and failed >= sent:
        code = EXIT_ALL_FAILED
        mark_ended(run_dir, say, reason=f"every one of its {sent} messages failed", kind="every message failed",
                    exit_code=EXIT_ALL_FAILED)
        say(f"{RUN_FAILED_MARK}every one of its {sent} messages failed (exit {EXIT_ALL_FAILED}); outputs in {run_dir}")
    elif code == 0 and failed:
        say(f"[fedgpu] run completed, but {failed} of {sent} messages failed; outputs in {run_dir}")
    else:
        ended = "stopped" if stopped_by else "completed" if code == 0 else "failed"
        say(f"[fedgpu] run {ended}; outputs in {run_dir}")
    return code
