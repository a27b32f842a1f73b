"""The caller's side of a zygote: the ``zygote`` launcher of the Isolator.

Nothing is sent to a zygote before it has proved it is ours (see
``protocol``): the directory and key must be our own and private, the process
on the socket must run as our user, and it must know the key. A failed check
is a ``ZygoteUntrusted`` that names what failed.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence

from fedgpu.isolation import wire
from fedgpu.isolation.exchange import SocketChild
from fedgpu.isolation.procs import (
    child_environment,
    open_sentinel,
    pythonpath_with_package,
    signal_group,
    stop_group,
    wait_readable,
)
from fedgpu.isolation.unix_paths import unix_address
from fedgpu.isolation.zygote.protocol import (
    ACCEPTED,
    CHALLENGE_BYTES,
    FDS_MARK,
    KEY_NAME,
    MAGIC,
    NONCE_BYTES,
    READY_NAME,
    SOCKET_NAME,
    ZygoteError,
    ZygoteUntrusted,
    caller_proof,
    check_private_dir,
    check_private_file,
    encode_frame,
    peer_uid,
    recv_exact,
    recv_frame,
    same,
    zygote_proof,
)
from fedgpu.names import ZYGOTE_ENV
from fedgpu.private_dirs import make_private_dir


def read_key(directory: str) -> bytes:
    path = os.path.join(directory, KEY_NAME)
    check_private_file(path)
    with open(path, "rb") as key_file:
        return key_file.read()


def connect(directory: str, key: bytes, timeout: float = 30.0) -> socket.socket:
    """A control connection to the zygote in ``directory``, both sides proven (see ``protocol``)."""
    check_private_dir(directory)
    path = os.path.join(directory, SOCKET_NAME)
    control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        control.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with unix_address(path) as address:
                    control.connect(address)
                break
            except BlockingIOError:
                # The zygote's accept queue is full (a flood): a Unix socket with a
                # timeout fails at once instead of waiting, so wait here.
                if time.monotonic() >= deadline:
                    raise ZygoteError(f"cannot reach the zygote at {directory}: "
                                      f"its queue stayed full for {timeout:g} s") from None
                time.sleep(0.01)
            except OSError as err:
                raise ZygoteError(f"cannot reach the zygote at {directory}: {err.strerror or err}") from None
        uid = peer_uid(control)
        if uid != os.geteuid():
            raise ZygoteUntrusted(f"the process serving {path} runs as uid {uid}, not as us (uid {os.geteuid()})")
        caller_nonce = os.urandom(NONCE_BYTES)
        try:
            control.sendall(MAGIC + caller_nonce)
            answer = recv_exact(control, CHALLENGE_BYTES)
        except (OSError, EOFError) as err:
            raise ZygoteError(f"the zygote at {directory} did not answer: {err}") from None
        zygote_nonce, proof = answer[:NONCE_BYTES], answer[NONCE_BYTES:]
        if not same(proof, zygote_proof(key, caller_nonce, zygote_nonce)):
            raise ZygoteUntrusted(f"the process serving {path} does not know the zygote's key: it is not our zygote")
        try:
            control.sendall(caller_proof(key, caller_nonce, zygote_nonce))
            accepted = recv_exact(control, 1) == ACCEPTED
        except (OSError, EOFError):
            accepted = False
        if not accepted:
            raise ZygoteError(f"the zygote at {directory} refused our key")
    except BaseException:
        control.close()
        raise
    return control


class ZygoteChild(SocketChild):
    """A child forked by the zygote, as the Isolator drives it.

    The control connection is the child's sentinel: the zygote writes the exit
    status there once it has reaped the child (or the connection closes if the
    zygote itself dies, and the status is unknown).
    """

    def __init__(self, pid: int, sock: socket.socket, control: socket.socket) -> None:
        self.pid = pid
        self.sock = sock
        self.control = control
        self.max_rss_kib = 0
        self.stopped_by: str | None = None  # set by whoever stops it: "timeout", "shutdown"
        self._exited = False
        self._returncode: int | None = None
        self._lock = threading.Lock()

    @property
    def sentinel(self) -> int:
        return self.control.fileno()

    def wait_exit(self, timeout: float | None) -> bool:
        if self._exited:
            return True
        if not wait_readable(self.control.fileno(), timeout):
            return False
        self._exited = True
        try:
            self.control.settimeout(5.0)
            reply = recv_frame(self.control)
            self._returncode, self.max_rss_kib = reply["returncode"], int(reply.get("max_rss_kib") or 0)
        except (EOFError, OSError, ValueError, KeyError):
            # The zygote died (the child got its parent-death signal): nobody knows the status.
            self._returncode = None
        return True

    def finish(self) -> int | None:
        with self._lock:
            if not self.wait_exit(0):
                signal_group(self.pid, 9)
                if not self.wait_exit(30.0):
                    self._exited = True  # the zygote is wedged; its reaper owns the rest
            self.sock.close()
            self.control.close()
            return self._returncode


class ZygoteLauncher:
    """``zygote``: fork each call from a warm zygote (shared, or our own).

    With ``directory`` (or ``$FEDGPU_ZYGOTE``) it uses the host's shared zygote,
    after checking that the directory is ours and private; otherwise it starts
    a private one, warmed with ``warm_ups``, that lives as long as this launcher
    (and dies with this process).
    """

    name = "zygote"

    def __init__(self, directory: str | None = None, *, warm_ups: Sequence[str] = (),
                 ready_timeout: float = 300.0) -> None:
        self.ready_timeout = ready_timeout
        self._private: subprocess.Popen | None = None
        self._private_parent: str | None = None
        self._key: bytes | None = None
        self._lock = threading.Lock()
        directory = directory or os.environ.get(ZYGOTE_ENV) or None
        if directory is None:
            # In a 0700 directory of ours that a later fedgpu process sweeps if we are killed
            # (the zygote removes only its own directory when it goes).
            self._private_parent = make_private_dir("zygote")
            directory = os.path.join(self._private_parent, "zygote")
            # Our own import path too: warm-ups may name modules found only there (an app's, say).
            path = os.pathsep.join([pythonpath_with_package(), *(entry for entry in sys.path if entry)])
            self._private = subprocess.Popen(
                [sys.executable, "-m", "fedgpu.isolation.zygote", "--dir", directory,
                 "--parent-pid", str(os.getpid()), *warm_ups],
                env={**os.environ, "PYTHONPATH": path},
                start_new_session=True,
                stdin=subprocess.DEVNULL,
            )
        else:
            check_private_dir(directory)
        self.directory = directory

    def _wait_ready(self, timeout: float | None = None) -> bytes:
        with self._lock:
            if self._key is not None:
                return self._key
            timeout = self.ready_timeout if timeout is None else timeout
            ready = os.path.join(self.directory, READY_NAME)
            deadline = time.monotonic() + timeout
            while not os.path.exists(ready):
                if self._private is not None and self._private.poll() is not None:
                    raise ZygoteError(f"the private zygote exited with code {self._private.returncode} "
                                      "before it was ready")
                if time.monotonic() > deadline:
                    raise ZygoteError(f"no zygote ready at {self.directory} after {timeout:g} s")
                time.sleep(0.05)
            self._key = read_key(self.directory)
            return self._key

    def _connect(self) -> socket.socket:
        key = self._wait_ready()
        try:
            return connect(self.directory, key)
        except ZygoteUntrusted:
            # A zygote replaced a dead one since we read the key: read it again, once.
            fresh = read_key(self.directory)
            if fresh == key:
                raise
            with self._lock:
                self._key = fresh
            return connect(self.directory, fresh)

    def check(self, timeout: float | None = None) -> None:
        """Wait until the zygote is ready and prove it is ours; raise ZygoteError/ZygoteUntrusted if not."""
        self._wait_ready(timeout)
        self._connect().close()

    def start(self, env: Mapping[str, str]) -> ZygoteChild:
        control = self._connect()
        parent_sock, child_sock = wire.socketpair()
        try:
            socket.send_fds(control, [FDS_MARK], [child_sock.fileno(), sys.stdout.fileno(), sys.stderr.fileno()])
            control.sendall(encode_frame({"env": child_environment(env), "cwd": os.getcwd()}))
            reply = recv_frame(control)
        except BaseException as err:
            parent_sock.close()
            control.close()
            if isinstance(err, (OSError, EOFError, ValueError)):
                raise ZygoteError(f"the zygote at {self.directory} did not start a child: {err}") from err
            raise
        finally:
            child_sock.close()
        if "started" not in reply:
            parent_sock.close()
            control.close()
            raise ZygoteError(f"the zygote refused to fork: {reply.get('refused', reply)}")
        return ZygoteChild(int(reply["started"]), parent_sock, control)

    def close(self) -> None:
        """Stop a private zygote (TERM, grace, KILL) and remove its directory."""
        if self._private is None:
            return
        private = self._private
        sentinel = open_sentinel(private.pid)

        def exited(timeout: float) -> bool:
            return sentinel is None or wait_readable(sentinel, timeout)

        stop_group(private.pid, 5.0, exited)
        private.wait()
        if sentinel is not None:
            os.close(sentinel)
        shutil.rmtree(self._private_parent or self.directory, ignore_errors=True)
        self._private = None
