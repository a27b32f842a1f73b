"""Objects through a socket: pickle protocol 5 with large buffers out of band.

The pickle stream carries only structure; NumPy arrays and large byte strings
travel as raw buffers written straight from their memory and read straight into
fresh writable memory, so a 100 MB result costs one copy on each side, not a
pickle of 100 MB plus copies of it. The pickler is multiprocess's dill-based
ForkingPickler, so functions defined in ``__main__`` and closures travel by value.
"""

from __future__ import annotations

import io
import pickle
import socket
import struct
import sys
from collections.abc import Callable
from typing import Any

from multiprocess.reduction import ForkingPickler

# Below this size a buffer is cheaper inside the pickle stream.
OUT_OF_BAND_MIN_BYTES = 64 * 1024

_HEADER = struct.Struct("!QI")  # pickle-stream length, number of buffers
_LENGTH = struct.Struct("!Q")

# type -> reducer returning a __reduce__ tuple; lets upper layers (e.g. the
# Flower integration) route their own byte-holding types out of band without
# the core knowing them.
_extra_reducers: dict[type, Callable[[Any], Any]] = {}


def register_reducer(cls: type, reducer: Callable[[Any], Any]) -> None:
    """Use ``reducer(obj)`` (a ``__reduce__``-style tuple) for exact type ``cls``."""
    _extra_reducers[cls] = reducer


def _bytes_from_buffer(buffer: Any) -> bytes:
    return bytes(buffer)


class _Pickler(ForkingPickler):
    def reducer_override(self, obj: Any) -> Any:  # pickle hook
        kind = type(obj)
        reducer = _extra_reducers.get(kind)
        if reducer is not None:
            return reducer(obj)
        if kind is bytes and len(obj) >= OUT_OF_BAND_MIN_BYTES:
            return _bytes_from_buffer, (pickle.PickleBuffer(obj),)
        numpy = sys.modules.get("numpy")
        if (
            numpy is not None
            and kind is numpy.ndarray
            and not obj.dtype.hasobject
            and obj.nbytes >= OUT_OF_BAND_MIN_BYTES
        ):
            # numpy's protocol-5 reduction hands over a PickleBuffer of its memory
            # (or copies once if the array is not contiguous).
            return obj.__reduce_ex__(5)
        return NotImplemented


# Larger socket buffers mean fewer wake-ups per megabyte (the kernel caps the
# request at net.core.wmem_max / rmem_max).
SOCKET_BUFFER_BYTES = 4 * 1024 * 1024


def socketpair() -> tuple[socket.socket, socket.socket]:
    """A connected pair of Unix stream sockets sized for bulk transfer."""
    pair = socket.socketpair()
    for sock in pair:
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_BYTES)
            except OSError:
                pass
    return pair


def dumps(obj: Any) -> tuple[bytes, list[pickle.PickleBuffer]]:
    """Pickle ``obj``; return the stream and the out-of-band buffers."""
    stream = io.BytesIO()
    buffers: list[pickle.PickleBuffer] = []
    # recurse=True: a __main__ function takes the globals it uses along with it.
    _Pickler(stream, protocol=5, buffer_callback=buffers.append, recurse=True).dump(obj)
    return stream.getvalue(), buffers


def loads(data: bytes, buffers: list[bytearray]) -> Any:
    return pickle.loads(data, buffers=buffers)


def send_object(sock: socket.socket, obj: Any) -> None:
    data, buffers = dumps(obj)
    views = [buffer.raw() for buffer in buffers]
    head = _HEADER.pack(len(data), len(views)) + b"".join(_LENGTH.pack(v.nbytes) for v in views)
    sock.sendall(head + data)
    for view in views:
        sock.sendall(view)


def recv_object(sock: socket.socket) -> Any:
    """Read one object; raise EOFError if the peer closed before a whole frame."""
    data_len, count = _HEADER.unpack(_recv_exactly(sock, _HEADER.size))
    lengths = [_LENGTH.unpack(_recv_exactly(sock, _LENGTH.size))[0] for _ in range(count)]
    data = _recv_exactly(sock, data_len)
    buffers = [_recv_exactly(sock, n) for n in lengths]
    return loads(data, buffers)


def _recv_exactly(sock: socket.socket, size: int) -> Any:
    numpy = sys.modules.get("numpy")
    if numpy is not None and size >= OUT_OF_BAND_MIN_BYTES:
        # Uninitialised (bytearray would zero it first: a second pass over
        # memory) and, being numpy's, backed by huge pages where the kernel
        # allows: the arrays unpickled from it use it in place.
        buffer = numpy.empty(size, dtype=numpy.uint8)
    else:
        buffer = bytearray(size)
    view = memoryview(buffer).cast("B")
    received = 0
    while received < size:
        n = sock.recv_into(view[received:], min(size - received, 1 << 24))
        if n == 0:
            raise EOFError(f"peer closed the connection after {received} of {size} bytes")
        received += n
    return buffer
