"""`fedgpu run APP_DIR`: an app we have never seen, Flower's own quickstart-pytorch, run unchanged.

The app (examples/quickstart-pytorch) is Flower's, with its data loading
swapped for an offline stand-in of the same shapes. Everything is real: the
SuperLink, the zygote, the client nodes, `flwr run`, the reports.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from helpers import (
    FEDGPU,
    ROOT,
    RUN_SH,
    events,
    kill_leftovers,
    kill_processes_with_env,
    processes_with_env,
    read_metrics,
    run_federation_command,
    wait_for,
)

APP = ROOT / "examples" / "quickstart-pytorch"


def fedgpu_run(run_dir: Path, *args: str, timeout: float = 600):
    return run_federation_command([str(FEDGPU), "run", *args, "--run-dir", str(run_dir)], run_dir, timeout=timeout)


def app_copy(tmp_path: Path, name: str = "app") -> Path:
    target = tmp_path / name
    shutil.copytree(APP, target, ignore=shutil.ignore_patterns("__pycache__"))
    return target


@pytest.mark.e2e
@pytest.mark.slow
def test_flowers_quickstart_runs_unchanged_every_message_isolated(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    code, output, sampler = fedgpu_run(run_dir, str(APP), "--nodes", "3", "--run-config", "num-server-rounds=2")
    assert code == 0, output
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "completed" and report["flower_status"] == "finished:completed", report
    assert report["app"]["name"] == "quickstart-pytorch" and report["run_config"] == {"num-server-rounds": 2}
    rounds = report["rounds"]
    assert [r["round"] for r in rounds] == [1, 2], rounds
    for entry in rounds:
        train = [m for m in entry["messages"] if m["type"] == "train"]
        assert len(train) == 3 and not entry["failed_messages"], entry  # FedAvg's fraction-train 1.0: every node
        assert all(m["isolation"] == "zygote" and m["child-pid"] != m["node-pid"] for m in entry["messages"]), entry
        assert all(m["node-torch-loaded"] is False for m in entry["messages"]), entry
    # The app's own output is on the console; its file lands in the run directory.
    assert "Saving final model to disk" in output, output
    assert (run_dir / "final_model.pt").is_file()
    # fedgpu's long-lived processes (launcher, server, SuperLink, nodes) never mapped torch; the children did.
    # (The app's own ServerApp does: it evaluates the global model with torch, as the app has it.)
    ours = [cmd for cmd in sampler.long_lived(torch=True) if "flwr-serverapp" not in cmd]
    assert ours == [], ours
    assert sampler.long_lived(torch=False), "the sampler saw the long-lived processes"
    summary = json.loads((run_dir / "memory.json").read_text())
    assert [entry["round"] for entry in summary["rounds"]] == [1, 2]  # rounds found from the children alone
    assert "[fedgpu] failures: none of" in output, output
    # What the app's FedAvg aggregated, per round, under the app's own metric keys (and its central evaluation).
    rows = read_metrics(run_dir)
    assert [row["round"] for row in rows] == ["1", "2"], rows
    assert list(rows[0]) == ["round", "train_train_loss", "evaluate_eval_loss", "evaluate_eval_acc", "server_accuracy",
                             "server_loss", "results", "failures", "round_seconds", "failure_reasons"], rows[0]
    # FedAvg: every node trains (fraction-train 1.0), two evaluate (fraction-evaluate 0.5, at least 2).
    assert all((row["results"], row["failures"]) == ("5", "0") and float(row["round_seconds"]) > 0
               for row in rows), rows
    assert [entry["metrics"]["server_accuracy"] for entry in rounds] == [float(row["server_accuracy"]) for row in rows]
    assert "[fedgpu] initial model: server accuracy " in output, output
    for number in (1, 2):
        assert re.search(rf"\[fedgpu\] round {number}/2: train train_loss \S+ \| evaluate eval_loss \S+, eval_acc \S+ "
                         r"\| server accuracy \S+, loss \S+ \| 5 results, 0 failures \| \S+ s", output), output
    # The strategy's final arrays, under the model's own names.
    with np.load(run_dir / "model.npz") as model:
        assert model.files[:2] == ["conv1.weight", "conv1.bias"] and model["fc3.bias"].shape == (10,), model.files
    # The zygote warmed up with the app's own ClientApp module.
    assert "pytorchexample.client_app" in (run_dir / "zygote.log").read_text()


@pytest.mark.e2e
def test_a_client_app_that_raises_on_one_node_costs_that_message_only(tmp_path: Path) -> None:
    app = app_copy(tmp_path)
    client = app / "pytorchexample" / "client_app.py"
    source = client.read_text()
    client.write_text(source.replace(
        '    """Train the model on local data."""\n',
        '    """Train the model on local data."""\n'
        '    if context.node_config["partition-id"] == 1:\n'
        '        raise ValueError("injected: node 1 cannot train")\n',
    ))
    run_dir = tmp_path / "run"
    code, output, _ = fedgpu_run(run_dir, str(app), "--nodes", "3", "--run-config", "num-server-rounds=1")
    assert code == 0, output
    (entry,) = json.loads((run_dir / "report.json").read_text())["rounds"]
    (failed,) = entry["failed_messages"]
    assert (failed["kind"], failed["client"], failed["detail"]) == (
        "raised ValueError", "1", "injected: node 1 cannot train")
    assert len([m for m in entry["messages"] if m["type"] == "train"]) == 2
    assert f"raised ValueError x1: round 1 train client 1 ({run_dir / 'client-1.log'})" in output, output


@pytest.mark.e2e
def test_ctrl_c_mid_run_of_an_app_leaves_nothing_behind(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [str(RUN_SH), "2", "--app", str(APP), "--run-config", "num-server-rounds=20", "--run-dir", str(run_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        child = lambda: any(e["event"] == "child-start" and e.get("role") == "client-child" for e in events(run_dir))  # noqa: E731
        assert wait_for(child, timeout=300, interval=0.1), "no message ever ran"
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=10)
        gone = wait_for(lambda: not processes_with_env("FEDGPU_RUN_DIR", str(run_dir)), timeout=10)
    finally:
        left = kill_leftovers(run_dir)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, proc.stderr.read() if proc.stderr else ""
    assert gone and not left, left
    # A complete report of what ran: the signal named, the memory reports written.
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "stopped" and report["stopped_by"] == "SIGINT", report
    assert (run_dir / "memory.png").stat().st_size > 0
    assert "rounds" in json.loads((run_dir / "memory.json").read_text())


def test_the_node_count_comes_from_the_apps_federation(tmp_path: Path) -> None:
    app = app_copy(tmp_path)
    with open(app / "pyproject.toml", "a") as pyproject:
        pyproject.write('\n[tool.flwr.federations]\ndefault = "local-simulation"\n\n'
                        '[tool.flwr.federations.local-simulation]\noptions.num-supernodes = 7\n')
    done = subprocess.run([str(FEDGPU), "run", str(app), "--check", "--run-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "7 client nodes for quickstart-pytorch" in done.stdout + done.stderr
    done = subprocess.run([str(FEDGPU), "run", str(app), "--nodes", "2", "--check", "--run-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300)
    assert "2 client nodes for quickstart-pytorch" in done.stdout + done.stderr
    # Its pinned versions differ from this environment's: a warning each, not a refusal.
    assert re.search(r"warning: quickstart-pytorch asks for torch==2\.8\.0; this environment has \S+",
                     done.stderr), done.stderr
    assert not (tmp_path / "run").exists(), "a check starts nothing and makes nothing"


def _bad_app(tmp_path: Path, case: str) -> tuple[list[str], str]:
    """(arguments to `fedgpu run`, the one line expected) for each kind of bad app."""
    if case == "not-a-directory":
        (tmp_path / "afile").write_text("")
        return [str(tmp_path / "afile")], f"{tmp_path / 'afile'}: not a directory"
    if case == "no-pyproject":
        (tmp_path / "empty").mkdir()
        return [str(tmp_path / "empty")], f"{tmp_path / 'empty'}: no pyproject.toml: not a Flower app directory"
    app = app_copy(tmp_path)
    pyproject = app / "pyproject.toml"
    if case == "no-components":
        pyproject.write_text(pyproject.read_text().replace("[tool.flwr.app.components]", "[tool.flwr.app.elsewhere]"))
        return [str(app)], "no [tool.flwr.app.components] with serverapp and clientapp: not a Flower app"
    if case == "client-does-not-import":
        client = app / "pytorchexample" / "client_app.py"
        client.write_text("import no_such_module_anywhere\n" + client.read_text())
        return [str(app)], ("quickstart-pytorch's clientapp pytorchexample.client_app:app does not import: "
                            "raised ModuleNotFoundError: No module named 'no_such_module_anywhere'")
    if case == "server-does-not-import":  # imported after the ClientApp, in the same child: named as its own
        server = app / "pytorchexample" / "server_app.py"
        server.write_text(server.read_text() + "\nraise ImportError('injected: no strategy here')\n")
        return [str(app)], ("quickstart-pytorch's serverapp pytorchexample.server_app:app does not import: "
                            "raised ImportError: injected: no strategy here")
    if case == "missing-dependency":
        pyproject.write_text(pyproject.read_text().replace('"torch==2.8.0",',
                                                           '"torch==2.8.0", "no-such-package-xyz>=1",'))
        return [str(app)], "quickstart-pytorch needs packages this environment lacks: no-such-package-xyz"
    if case == "task-option-with-app":
        return [str(app), "--lr", "0.1"], "--lr is for fedgpu's own tasks; a Flower app takes --run-config"
    if case == "unknown-run-config-key":
        return [str(app), "--run-config", "num-rounds=3"], "--run-config: num-rounds not in quickstart-pytorch's config"
    raise AssertionError(case)


BAD_APPS = ["not-a-directory", "no-pyproject", "no-components", "client-does-not-import", "server-does-not-import",
            "missing-dependency", "task-option-with-app", "unknown-run-config-key"]


@pytest.mark.parametrize("case", BAD_APPS)
def test_a_bad_app_is_one_line_and_exit_2_before_anything_starts(tmp_path: Path, case: str) -> None:
    args, line = _bad_app(tmp_path, case)
    run_dir = tmp_path / "run"
    done = subprocess.run([str(FEDGPU), "run", *args, "--run-dir", str(run_dir)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done
    errors = [text for text in done.stderr.splitlines() if "warning:" not in text]
    assert len(errors) == 1 and errors[0].startswith("fedgpu: error: ") and line in errors[0], done.stderr
    assert not run_dir.exists()


@pytest.mark.e2e
def test_a_server_app_that_fails_at_once_shows_its_last_lines(tmp_path: Path) -> None:
    app = app_copy(tmp_path)
    server = app / "pytorchexample" / "server_app.py"
    server.write_text(server.read_text().replace(
        '    num_rounds: int = context.run_config["num-server-rounds"]\n',
        '    num_rounds: int = context.run_config["num-server-rounds"]\n'
        '    raise RuntimeError("injected: the strategy cannot start")\n',
    ))
    run_dir = tmp_path / "run"
    code, output, _ = fedgpu_run(run_dir, str(app), "--nodes", "2")
    assert code == 1, output
    assert re.search(r"\[fedgpu\] the ServerApp failed: .*RuntimeError: injected: the strategy cannot start.*"
                     rf"\(see {re.escape(str(run_dir / 'serverapp.log'))}\)", output), output
    assert json.loads((run_dir / "report.json").read_text())["status"] == "failed"


def _recipe() -> str:
    readme = (ROOT / "docs" / "flower-apps.md").read_text()
    after = readme.split("<!-- the manual recipe: tests/test_app.py runs this block as it is -->", 1)[1]
    return after.split("```bash\n", 1)[1].split("```", 1)[0]


@pytest.mark.e2e
@pytest.mark.slow
def test_the_manual_recipe_in_the_readme_runs_as_written(tmp_path: Path) -> None:
    """fedgpu client --mp nodes under a SuperLink started by hand, the app submitted with flwr run."""
    marker = f"recipe-{os.getpid()}-{tmp_path.name}"
    env = {**os.environ, "FEDGPU_RECIPE_MARKER": marker}
    model = ROOT / "final_model.pt"  # the app's ServerApp saves it in its working directory: the checkout here
    had_model = model.exists()
    try:
        done = subprocess.run(["bash", "-c", _recipe()], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    finally:
        left = processes_with_env("FEDGPU_RECIPE_MARKER", marker)
        kill_processes_with_env("FEDGPU_RECIPE_MARKER", marker)
        if not had_model:
            model.unlink(missing_ok=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert '"status": "finished:completed"' in done.stdout, done.stdout[-3000:]
    assert "Saving final model to disk" in done.stdout
    assert wait_for(lambda: not processes_with_env("FEDGPU_RECIPE_MARKER", marker), timeout=15), left
