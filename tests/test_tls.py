"""Multi-host security on 127.0.0.1: TLS and SuperNode authentication, end to end."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from helpers import (
    FEDGPU,
    ROOT,
    Gate,
    cleaned_up,
    free_port,
    processes_with_env,
    read_metrics,
    read_or_empty,
    start_run_sh,
    wait_for,
)
from other_uid import other_user

MAKE_CERTS = ROOT / "launchers" / "make-certs.sh"


@pytest.mark.e2e
@pytest.mark.slow
def test_a_federation_over_tls_admits_registered_nodes_only(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Nodes without a registered key or without TLS are refused; as root, so is another uid's `flwr run`
    even with the CA in hand, and its raw requests with certificates unchecked."""
    try:
        intruder = other_user(tmp_path_factory)
    except pytest.skip.Exception:
        intruder = None  # not root: the other-uid part is covered where the suite runs as root
    run_dir, port = tmp_path / "run", free_port()
    # Client 0's first training waits at a gate the test opens once every refusal is tried: the run surely goes on.
    gate = Gate(tmp_path / "gate")
    proc = start_run_sh(["2", "2", "2", "2", "--tls", "--port", str(port), "--run-dir", str(run_dir),
                         "--task", "fault_task:FaultyDigits"], env=gate.env(dict(os.environ)))
    certs = run_dir / "certs"
    with cleaned_up(proc, run_dir):
        assert gate.reached(180), read_or_empty(run_dir / "server.log")
        # First: another uid with the CA in hand.
        if intruder is not None:
            ca_copy = intruder.home / "ca.crt"  # a CA certificate is no secret: say the intruder has it
            shutil.copy(certs / "ca.crt", ca_copy)
            os.chown(ca_copy, intruder.uid, intruder.gid)
            marker = intruder.home / "marker"
            submitted = intruder.submit(port, marker, ca_file=ca_copy)
            unchecked = intruder.post(f"https://127.0.0.1:{port}/v1/control/start-run")
            still_running = proc.poll() is None
        # A node with a key the server never registered is refused, with TLS and the right CA.
        subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(tmp_path / "intruder")],
                       check=True)
        node_env = {**os.environ, "FEDGPU_RUN_DIR": str(run_dir)}
        unregistered_node = subprocess.Popen(
            [str(FEDGPU), "client", "--mp", "--isolation", "spawn", "--superlink", f"127.0.0.1:{port}",
             "--partition-id", "0", "--num-partitions", "2", "--root-certificates", str(certs / "ca.crt"),
             "--auth-private-key", str(tmp_path / "intruder"), "--max-wait-time", "5"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=node_env,
        )
        # And so is a node that does not speak TLS (tried at the same time).
        plaintext_node = subprocess.Popen(
            [str(FEDGPU), "client", "--mp", "--isolation", "spawn", "--superlink", f"127.0.0.1:{port}",
             "--partition-id", "1", "--num-partitions", "2", "--max-wait-time", "5"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=node_env,
        )
        unregistered = unregistered_node.communicate(timeout=120)[0], unregistered_node.returncode
        plaintext = plaintext_node.communicate(timeout=120)[0], plaintext_node.returncode
        gate.open()
        out, err = proc.communicate(timeout=300)
        nothing_left = wait_for(lambda: not processes_with_env("FEDGPU_RUN_DIR", str(run_dir)), 5)
    assert proc.returncode == 0, out + err
    assert nothing_left, "processes of the run outlived run.sh"
    assert [int(r["results"]) for r in read_metrics(run_dir)] == [2, 2]
    assert f"SuperLink listening on https://127.0.0.1:{port}" in read_or_empty(run_dir / "superlink.log")
    for i in range(2):
        assert "SuperNode ID" in read_or_empty(run_dir / f"client-{i}.log")
    if intruder is not None:
        assert still_running, "the run ended before the other uid's attempts: they proved nothing"
        assert submitted.returncode != 0 and "answers only its owner's processes" in submitted.stderr, submitted.stderr
        assert not marker.exists() and unchecked == "403", unchecked
    assert unregistered[1] != 0 and "Failed to activate SuperNode" in unregistered[0], unregistered
    assert plaintext[1] != 0 and "SuperNode ID" not in plaintext[0], plaintext
    # Private keys stay private.
    assert stat.S_IMODE(certs.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(key.stat().st_mode) == 0o600
               for key in [certs / "ca.key", certs / "server.key", *certs.glob("nodes/node-?")])


def test_make_certs_names_what_it_wrote_and_rejects_bad_input(tmp_path: Path) -> None:
    done = subprocess.run([str(MAKE_CERTS), str(tmp_path / "c"), "--nodes", "2", "--host", "gpu-box-1",
                           "--host", "10.0.0.7"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    text = subprocess.run(["openssl", "x509", "-in", str(tmp_path / "c" / "server.pem"), "-noout", "-text"],
                          capture_output=True, text=True, check=True).stdout
    assert "IP Address:127.0.0.1" in text and "DNS:gpu-box-1" in text and "IP Address:10.0.0.7" in text
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "c" / "ca.crt"),
                             str(tmp_path / "c" / "server.pem")],
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert sorted(p.name for p in (tmp_path / "c" / "nodes").iterdir()) == [
        "node-0", "node-0.pub", "node-1", "node-1.pub"]
    for args, message in [
        ([str(tmp_path / "c")], "already holds a CA"),
        ([str(tmp_path / "d"), "--nodes", "x"], "--nodes needs a whole number"),
        ([], "usage: make-certs.sh DIR"),
        ([str(tmp_path / "e"), "--bogus"], "unknown option --bogus"),
    ]:
        done = subprocess.run([str(MAKE_CERTS), *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and message in done.stderr, (args, done.stderr)
