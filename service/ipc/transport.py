"""How front-ends and executors talk: tensors through shared memory, small messages over a Unix socket.

Each HTTP front-end owns one :class:`Arena`, a file in ``/dev/shm`` mapped by the front-end and,
read/write, by every executor. For a task the front-end allocates one region holding the input
tensors and room for the output, writes the inputs, and sends the executor a short control
message (:class:`~service.ipc.messages.Run`) that names the region's offsets, shapes and dtypes.
The executor reads the inputs in place, writes the output into the region, and answers with
another short message. The region stays the front-end's: it is freed only after the executor's
answer (result, error or "cancelled"), or once that executor is known to be dead, so an
executor never writes into memory that another request has been given.

The control channel (:class:`Channel`) is one Unix-domain stream socket per front-end and
executor, driven by the event loop itself (asyncio streams; uvloop in executors, asyncio's loop in
front-ends, see :func:`service.frontend.http.run_uvicorn`): each frame is a 4-byte
length and a MessagePack array of typed messages (:mod:`service.ipc.messages`), and whatever a process posts in one turn of its event loop
leaves as one frame. A dead peer is an end of stream, seen at once. ZeroMQ (pyzmq, as vLLM and
LitServe use) was the first choice and was measured against this on the 2-core machine: a
zmq.asyncio round trip between two processes cost 360–400 µs and about 230 µs of CPU on each
side (its I/O threads add two thread hand-offs per message), against 60–90 µs and 35–45 µs for a
uvloop Unix socket; at a thousand requests a second that difference is a fifth of the service's
CPU. The framing is the only part written here.
"""

from __future__ import annotations

import asyncio
import bisect
import math
import mmap
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.ipc.messages import Codec, Message, TensorRef

ALIGN = 64  # bytes; every tensor starts on a cache line
MAX_FRAME = 256 << 20  # bytes of one control frame; far above what any batch of messages needs
_LENGTH = struct.Struct("<I")


class Channel:
    """One connection between a front-end and an executor: frames of message lists, both ways.

    :meth:`post` queues a message; everything posted in one turn of the event loop is written as one
    frame. :meth:`receive` returns the next frame's messages (decoded by ``codec``, which knows what
    this side receives), and raises :class:`ConnectionError` when the peer has gone.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, codec: Codec) -> None:
        self.reader, self.writer, self.codec = reader, writer, codec
        self._outbox: list[Message] = []

    @property
    def closed(self) -> bool:
        return self.writer.is_closing()

    def post(self, msg: Message) -> None:
        self._outbox.append(msg)
        if len(self._outbox) == 1:
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        msgs, self._outbox = self._outbox, []
        if msgs and not self.writer.is_closing():
            body = self.codec.encode(msgs)
            self.writer.write(_LENGTH.pack(len(body)) + body)

    async def receive(self) -> list:
        try:
            (n,) = _LENGTH.unpack(await self.reader.readexactly(4))
            if n > MAX_FRAME:
                raise ConnectionError(f"a control frame of {n} bytes")
            return self.codec.decode(await self.reader.readexactly(n))
        except asyncio.IncompleteReadError:
            raise ConnectionError("the peer closed the connection") from None

    def close(self) -> None:
        self.writer.close()


def shm_root() -> Path:
    """Where arenas live: ``/dev/shm`` (tmpfs) when writable, else the temporary directory."""
    dev = Path("/dev/shm")
    return dev if dev.is_dir() and os.access(dev, os.W_OK) else Path(tempfile.gettempdir())


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class ArenaFull(Exception):
    """No region of the requested size is free now."""


class Arena:
    """A shared-memory file with a first-fit allocator (owner side) and typed views (both sides).

    Offsets and sizes are bytes. The owner (a front-end) creates the file, reserves its pages
    (``posix_fallocate``: a too-small ``/dev/shm`` fails at start with a clear error instead of
    a SIGBUS later) and allocates; executors :meth:`attach` and only read and write views.
    """

    def __init__(self, path: Path, size: int, mm: mmap.mmap, owner: bool) -> None:
        self.path, self.size, self._mm, self.owner = path, size, mm, owner
        self._free: list[tuple[int, int]] = [(0, size)]  # sorted (offset, size) of free blocks
        self._used: dict[int, int] = {}
        self._freed = asyncio.Event() if owner else None

    @classmethod
    def create(cls, path: Path, size: int) -> Arena:
        size = _aligned(size)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, size)
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as e:
                raise OSError(f"cannot reserve {size >> 20} MiB of shared memory at {path} ({e.strerror}); "
                              "give /dev/shm more room (docker: --shm-size; Kubernetes: an emptyDir with medium: Memory) "
                              "or lower FLOWSERVE_SHM_ARENA_MB") from None
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        return cls(path, size, mm, owner=True)

    @classmethod
    def attach(cls, path: str | Path) -> Arena:
        fd = os.open(path, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        return cls(Path(path), size, mm, owner=False)

    # --- allocation (owner) ------------------------------------------------------------------

    def alloc(self, nbytes: int) -> int:
        """Offset of a free region of at least ``nbytes``; :class:`ArenaFull` when none is free."""
        need = _aligned(max(nbytes, 1))
        for i, (off, size) in enumerate(self._free):
            if size >= need:
                if size == need:
                    del self._free[i]
                else:
                    self._free[i] = (off + need, size - need)
                self._used[off] = need
                return off
        raise ArenaFull(f"{need} bytes")

    async def alloc_wait(self, nbytes: int, timeout_s: float) -> int:
        """:meth:`alloc`, waiting up to ``timeout_s`` for regions to be freed (back-pressure)."""
        if _aligned(nbytes) > self.size:
            raise ValueError(f"{nbytes} bytes exceed the arena ({self.size} bytes)")
        try:
            return self.alloc(nbytes)
        except ArenaFull:
            pass
        async with asyncio.timeout(timeout_s):
            while True:
                try:
                    return self.alloc(nbytes)
                except ArenaFull:
                    self._freed.clear()
                    await self._freed.wait()

    def free(self, offset: int) -> None:
        size = self._used.pop(offset)
        i = bisect.bisect(self._free, (offset, size))
        # coalesce with the next and the previous free block
        if i < len(self._free) and self._free[i][0] == offset + size:
            size += self._free.pop(i)[1]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == offset:
            offset, size = self._free[i - 1][0], self._free[i - 1][1] + size
            i -= 1
            self._free[i] = (offset, size)
        else:
            self._free.insert(i, (offset, size))
        self._freed.set()

    # --- views (both sides) ------------------------------------------------------------------

    def view(self, ref: TensorRef, base: int = 0) -> np.ndarray:
        """The tensor ``ref`` = ``(offset, shape, dtype)`` (offset from ``base``) as a numpy view into the shared memory."""
        offset, shape, dtype = ref
        return np.frombuffer(self._mm, dtype=dtype, count=math.prod(shape), offset=base + offset).reshape(shape)

    def close(self, unlink: bool = False) -> None:
        try:
            self._mm.close()
        except BufferError:  # a view is still alive somewhere; the mapping goes with the process
            pass
        if unlink:
            self.path.unlink(missing_ok=True)


@dataclass(frozen=True)
class Layout:
    """Where a task's tensors go in one region, as offsets from its start: each input, then the output."""

    inputs: dict[str, TensorRef]
    output: TensorRef
    nbytes: int

    @classmethod
    def plan(cls, arrays: dict[str, np.ndarray], out_shape: tuple[int, ...], out_dtype: np.dtype) -> Layout:
        refs, pos = {}, 0
        for k, a in arrays.items():
            refs[k] = (pos, a.shape, a.dtype.str)
            pos += _aligned(a.nbytes)
        out = (pos, tuple(out_shape), out_dtype.str)
        pos += _aligned(math.prod(out_shape) * out_dtype.itemsize)
        return cls(refs, out, pos)
