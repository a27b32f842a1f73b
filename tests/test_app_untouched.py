"""A user's Flower app is only ever read, and what `--check` lets through does not fail after the start.

The app (tests/apps/untouched_numpy) is written as Flower's templates before
1.42 were: its federation in a ``[tool.flwr.federations]`` table, which
`flwr run` 1.42 migrates out of the file. Runs are real (SuperLink, zygote,
nodes, `flwr run`); the federation forms are read as Flower itself writes them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fedgpu.flower.app import FlowerApp, private_copy

from helpers import FEDGPU, ROOT, RUN_SH, run_federation_command

APP = ROOT / "tests" / "apps" / "untouched_numpy"
NAME = "untouched-numpy"
TABLE = "pyproject.toml [tool.flwr.federations.local-simulation]"


def app_copy(tmp_path: Path, name: str = "app") -> Path:
    target = tmp_path / name
    shutil.copytree(APP, target, ignore=shutil.ignore_patterns("__pycache__"))
    return target


def tree_digest(directory: Path) -> str:
    """Every entry's name, type and mode, and every file's bytes: any write into the tree changes it."""
    digest = hashlib.sha256()
    for path in sorted(directory.rglob("*")):
        info = path.lstat()
        digest.update(f"{path.relative_to(directory)}\0{info.st_mode:o}\0".encode())
        if path.is_file() and not path.is_symlink():
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


# -- two runs, the app unchanged --------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.slow
def test_two_runs_leave_the_app_directory_as_it_was_and_both_read_its_federation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = app_copy(tmp_path)
    user_home = tmp_path / "user-flwr-home"  # the user's Flower config: none, and none is written
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setenv("FLWR_HOME", str(user_home))
    monkeypatch.setenv("TMPDIR", str(temp))  # where the run's private directory (and the app's copy) lives
    before = tree_digest(app)
    runs = [
        ("fedgpu", [str(FEDGPU), "run", str(app)]),  # node count from the app's federation (2), not the default 10
        ("run.sh", [str(RUN_SH), "--app", str(app)]),
    ]
    for prog, argv in runs:
        run_dir = tmp_path / f"run-{prog}"
        code, output, _ = run_federation_command([*argv, "--run-dir", str(run_dir)], run_dir, timeout=600)
        assert code == 0, output
        assert f"{prog}: 2 client nodes for {NAME}" in output, output
        assert "Migration" not in output and "Heads up from Flower" not in output, output
        # FedAvg of two nodes pulling towards 0 and 1 at lr 0.5, from zeros: 0.25 everywhere.
        assert "untouched-numpy final weights [0.25, 0.25, 0.25, 0.25]" in output, output
        report = json.loads((run_dir / "report.json").read_text())
        assert report["status"] == "completed", report
        assert report["app"]["directory"] == str(app)
        federation = {"num-supernodes": 2, "client-resources": {"num-cpus": 1, "num-gpus": 0.25}, "from": TABLE}
        assert report["app"]["federation"] == federation, report["app"]
        assert tree_digest(app) == before, f"the {prog} run wrote into {app}: {sorted(p.name for p in app.rglob('*'))}"
    assert not user_home.exists(), "the user's Flower config was written"
    assert not list(temp.glob("fedgpu-*")), f"left in the temporary folder: {sorted(p.name for p in temp.iterdir())}"


# -- the federation, in both of Flower's forms ----------------------------------------------------


def test_the_federation_is_read_from_the_apps_table(tmp_path: Path) -> None:
    app = FlowerApp.read(app_copy(tmp_path), flwr_home=tmp_path / "no-home")
    assert (app.num_supernodes, app.federation.num_cpus, app.federation.num_gpus) == (2, 1, 0.25)
    assert app.federation.source == TABLE


def test_the_federation_is_read_where_flowers_migration_moved_it(tmp_path: Path) -> None:
    """Flower 1.42's own migration (what `flwr run` does to the app) writes the 1.42 form; it reads the same."""
    app_dir, home = app_copy(tmp_path), tmp_path / "flwr-home"
    migrate = ("import sys; from flwr.cli.config_migration import migrate; "
               "migrate(sys.argv[1], [], ignore_legacy_usage=True)")
    done = subprocess.run([sys.executable, "-c", migrate, str(app_dir)], env={**os.environ, "FLWR_HOME": str(home)},
                          capture_output=True, text=True, timeout=120)
    assert "Migration completed successfully" in done.stdout, done.stdout + done.stderr
    assert "# [tool.flwr.federations]" in (app_dir / "pyproject.toml").read_text()  # what fedgpu must never let happen
    app = FlowerApp.read(app_dir, flwr_home=home)
    assert (app.num_supernodes, app.federation.num_cpus, app.federation.num_gpus) == (2, 1, 0.25)
    assert app.federation.source == f"{home / 'config.toml'} [superlink.local-simulation]"
    # Flower's default connection ("local", no options) says nothing: the node count is then fedgpu's default.
    config = home / "config.toml"
    config.write_text(config.read_text().replace('default = "local-simulation"', 'default = "local"'))
    assert FlowerApp.read(app_dir, flwr_home=home).num_supernodes is None


def test_the_submitted_copy_is_flowers_package_of_the_app_without_its_federation(tmp_path: Path) -> None:
    app_dir = app_copy(tmp_path)
    before = tree_digest(app_dir)
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    copy = private_copy(app_dir, private)
    assert copy == private / "app" and (copy.stat().st_mode & 0o777) == 0o700
    names = sorted(str(path.relative_to(copy)) for path in copy.rglob("*") if path.is_file())
    assert names == ["pyproject.toml", "untouched/__init__.py", "untouched/client_app.py", "untouched/model.py",
                     "untouched/server_app.py"], names
    text = (copy / "pyproject.toml").read_text()
    assert "federations" not in text and 'clientapp = "untouched.client_app:app"' in text, text
    assert tree_digest(app_dir) == before


# -- what the check refuses, before anything starts ---------------------------------------------

RELATIVE_FILE = 'open("client-data.csv").read()  # relative to the working directory\n'
THREAD_AT_IMPORT = ('import threading, time\n'
                    'threading.Thread(target=time.sleep, args=(3600,), name="prefetch", daemon=True).start()\n')


def _refused(tmp_path: Path, case: str) -> tuple[list[str], str]:
    """(the command, the one line it must print) for each app or override the check must refuse."""
    app = app_copy(tmp_path)
    client = app / "untouched" / "client_app.py"
    if case == "relative-file-at-import":
        # There in the caller's directory, as a user would have it: the zygote and the nodes work elsewhere.
        (tmp_path / "client-data.csv").write_text("1,2\n")
        client.write_text(RELATIVE_FILE + client.read_text())
        return [str(FEDGPU), "run", str(app)], (
            f"{NAME}'s clientapp untouched.client_app:app does not import: raised FileNotFoundError: "
            "[Errno 2] No such file or directory: 'client-data.csv' (fedgpu imports it in the run directory")
    if case == "thread-at-import":
        client.write_text(THREAD_AT_IMPORT + client.read_text())
        return [str(FEDGPU), "run", str(app)], (
            f"{NAME}'s clientapp module untouched.client_app starts threads when imported (prefetch): "
            "fedgpu forks every message from a warm process, which must be single-threaded")
    if case == "rounds-below-one":
        return [str(FEDGPU), "run", str(app), "--run-config", "num-server-rounds=-1"], (
            "--run-config: num-server-rounds=-1: the number of rounds must be at least 1")
    if case == "rounds-as-a-string":
        return [str(FEDGPU), "run", str(app), "--run-config", 'num-server-rounds="abc"'], (
            f'--run-config: num-server-rounds="abc" is a string; {NAME}\'s num-server-rounds takes a whole number '
            "(default 1)")
    if case == "run-sh-rounds-zero":
        return [str(RUN_SH), "2", "--app", str(app), "--run-config", "num-server-rounds=0"], (
            "--run-config: num-server-rounds=0: the number of rounds must be at least 1")
    if case == "bool-for-a-float":
        return [str(FEDGPU), "run", str(app), "--run-config", "learning-rate=true"], (
            f"--run-config: learning-rate=true is a boolean; {NAME}'s learning-rate takes a number (default 0.5)")
    if case == "number-for-a-string":
        return [str(FEDGPU), "run", str(app), "--run-config", "tag=3"], (
            f"--run-config: tag=3 is a whole number; {NAME}'s tag takes a \"quoted string\" (default \"plain\")")
    raise AssertionError(case)


REFUSED = ["relative-file-at-import", "thread-at-import", "rounds-below-one", "rounds-as-a-string",
           "run-sh-rounds-zero", "bool-for-a-float", "number-for-a-string"]


@pytest.mark.parametrize("case", REFUSED)
def test_the_check_refuses_what_would_fail_after_the_start(tmp_path: Path, case: str) -> None:
    argv, line = _refused(tmp_path, case)
    run_dir = tmp_path / "run"
    # --check first, as a user checks; then the run itself, which must refuse the same way before it starts.
    for extra in (["--check"], []):
        done = subprocess.run([*argv, *extra, "--run-dir", str(run_dir)], cwd=tmp_path, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 2, done
        errors = [text for text in done.stderr.splitlines() if "warning:" not in text]
        assert len(errors) == 1 and line in errors[0], done.stderr
        assert not run_dir.exists(), "refused, yet something was made"


def test_overrides_of_the_apps_own_types_pass_the_check(tmp_path: Path) -> None:
    """A float takes a whole number; every other type only its own."""
    app = app_copy(tmp_path)
    overrides = 'num-server-rounds=2 learning-rate=1 tag="other" verbose=true'
    done = subprocess.run([str(FEDGPU), "run", str(app), "--check", "--run-config", overrides,
                           "--run-dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"2 client nodes for {NAME}" in done.stdout + done.stderr
