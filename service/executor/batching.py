"""Dynamic batching per model and task.

Requests put rows on a bounded queue (counted in rows; full → 503 with Retry-After). One
consumer per replica takes everything that queued while its device was busy, up to
``max_batch_size`` rows, waiting at most ``max_queue_delay`` for more (by default only under load,
see :func:`auto_queue_wait`; a lone request runs at once), runs the batch on its device worker,
and hands each request its own rows back. A request larger than ``max_batch_size`` runs alone,
split into chunks of at most ``max_batch_size`` rows. Every row's result depends only on that row
(and its own noise), never on its batch-mates. A request that gives up (timeout, or its client
disconnected) frees its share of the queue at once, is skipped if still queued, and an oversized
one stops between chunks.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from service.core.entry import Gone, Payload, row_chunks, rows_of, watch_client
from service.errors import ClientClosed, Unavailable
from service.executor.workers import DeviceWorker
from service.metrics import Metrics

log = logging.getLogger(__name__)

Compute = Callable[[object, Payload], np.ndarray]


@dataclass
class _Item:
    payload: Payload
    rows: int
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)
    counted: bool = True  # its rows count toward the queue's limit until taken or withdrawn


@dataclass(frozen=True)
class Replica:
    worker: DeviceWorker
    runner: object


AUTO_DELAY_CAP_S = 0.010
AUTO_DELAY_PROBE_ROWS = 16


@dataclass(frozen=True)
class QueueWait:
    """How long a batch may wait to fill: up to ``delay_s``, only after a batch of at least
    ``from_rows`` rows (0: always), and no longer once it holds ``until_rows`` rows (``None``: full)."""

    delay_s: float = 0.0
    from_rows: int = 0
    until_rows: int | None = None


def describe(wait: QueueWait) -> str:
    """``wait`` in words, for a model's ``execution`` (e.g. "batches wait up to 4.1 ms after batches of 16+ rows, below 48 rows")."""
    text = f"batches wait up to {wait.delay_s * 1000:.1f} ms"
    if wait.from_rows:
        text += f" after batches of {wait.from_rows}+ rows"
    if wait.until_rows is not None:
        text += f", below {wait.until_rows} rows"
    return text


def auto_queue_wait(one_row_s: float, probe_rows_s: float, probe_rows: int = AUTO_DELAY_PROBE_ROWS) -> QueueWait:
    """The wait under ``max_queue_delay_ms=auto``, from one call's time (seconds) on one row and on
    ``probe_rows`` rows: a call costs about ``fixed + rows * per_row``.

    A call whose cost is mostly fixed (``probe_rows_s < 2 * one_row_s``: many rows cost less than two
    calls of one) waits up to that fixed cost, at most :data:`AUTO_DELAY_CAP_S`: the ski-rental rule,
    the wait never exceeds the cost of the call it may save, while each call carries more rows and
    the fixed cost per row falls (the traced digits Glow on the CPU: ~4 ms at 1 row, ~5 ms at 16).
    It stops waiting once the batch's rows cost as much as the fixed cost (``until_rows = fixed /
    per_row``): beyond that, more rows save little. And it waits only after a batch of at least
    ``probe_rows`` rows (``from_rows``), i.e. under load: with 16 closed-loop clients (batches of ~6
    rows) waiting cost up to a third of the throughput, so at light load nothing waits. A call whose
    cost grows with its rows (ONNX Runtime on the same model: 0.4 ms and 1.5 ms) does not wait.
    """
    if probe_rows < 2 or probe_rows_s >= 2 * one_row_s:
        return QueueWait()
    per_row = max(probe_rows_s - one_row_s, 0.0) / (probe_rows - 1)
    fixed = max(one_row_s - per_row, 0.0)
    until = math.ceil(round(fixed / per_row, 6)) if per_row > 0 else None  # round: 40.0000001 rows is 40
    return QueueWait(min(fixed, AUTO_DELAY_CAP_S), probe_rows, until)


class Batcher:
    """Queue + consumers for one (model, task)."""

    def __init__(
        self,
        model: str,
        task: str,
        compute: Compute,
        replicas: list[Replica],
        metrics: Metrics,
        max_batch_size: int,
        wait: QueueWait,
        max_queue_rows: int,
    ) -> None:
        self.model, self.task, self.compute = model, task, compute
        self.replicas = replicas
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.wait = wait
        self._fill_rows = max_batch_size if wait.until_rows is None else wait.until_rows  # waiting stops here
        self._last_batch_rows = 0
        self.max_queue_rows = max_queue_rows
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._rows = 0
        self._tasks: list[asyncio.Task] = []
        self._mean_batch_s = 0.01
        self._depth = metrics.queue_depth.labels(model, task)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._consume(r), name=f"batcher-{self.model}-{self.task}-{i}") for i, r in enumerate(self.replicas)]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if not item.future.done():
                item.future.set_exception(Unavailable(f"model {self.model!r} was unloaded", "unloaded", 1))

    @property
    def idle(self) -> bool:
        return self._rows == 0

    async def submit(self, payload: Payload, timeout_s: float, gone: Gone | None = None) -> np.ndarray:
        """Queue ``payload`` (arrays with equal first dimension) and wait for its rows' results.

        ``gone`` (e.g. Starlette's ``request.is_disconnected``, see :func:`~service.core.entry.watch_client`):
        when the client left, the rows leave the queue and the request ends with :class:`ClientClosed` (499).
        """
        rows = rows_of(payload)
        if self._rows + rows > self.max_queue_rows:
            self.metrics.rejections.labels(self.model, "queue_full").inc()
            wait = self._mean_batch_s * max(1.0, self._rows / self.max_batch_size)
            raise Unavailable(f"queue for model {self.model!r} is full ({self._rows} rows waiting); retry later", "queue_full", wait)
        loop = asyncio.get_running_loop()
        item = _Item(payload, rows, loop.create_future())
        self._rows += rows
        self._depth.set(self._rows)
        self._queue.put_nowait(item)
        unwatch = watch_client(item.future, gone, f"model {self.model!r}")
        try:
            async with asyncio.timeout(timeout_s):
                return await item.future  # on timeout or cancellation the future is cancelled; consumers skip it
        except TimeoutError:
            self.metrics.rejections.labels(self.model, "timeout").inc()
            raise Unavailable(f"request to model {self.model!r} timed out after {timeout_s:g} s", "timeout", timeout_s) from None
        finally:
            unwatch()
            if not item.future.done():
                item.future.cancel()
            if item.future.cancelled() or isinstance(item.future.exception(), ClientClosed):
                self._uncount(item)  # a request that gave up frees its share of the queue at once

    def _uncount(self, item: _Item) -> None:
        if item.counted:
            item.counted = False
            self._rows -= item.rows
            self._depth.set(self._rows)

    def _take(self, item: _Item) -> bool:
        """Account for an item leaving the queue; False if its client gave up already."""
        self._uncount(item)
        return not item.future.done()

    async def _consume(self, replica: Replica) -> None:
        carry: _Item | None = None
        while True:
            first = carry or await self._queue.get()
            carry = None
            if not self._take(first):
                continue
            batch, rows = [first], first.rows
            waits = self._last_batch_rows >= self.wait.from_rows
            deadline = time.monotonic() + (self.wait.delay_s if waits else 0.0)
            while rows < self.max_batch_size:
                try:
                    nxt = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or rows >= self._fill_rows:
                        break
                    try:
                        nxt = await asyncio.wait_for(self._queue.get(), remaining)
                    except asyncio.TimeoutError:
                        break
                if rows + nxt.rows > self.max_batch_size:
                    carry = nxt  # stays counted in the queue until the next batch takes it
                    break
                if self._take(nxt):
                    batch.append(nxt)
                    rows += nxt.rows
            self._last_batch_rows = rows
            await self._run(replica, batch, rows)

    async def _compute_in_chunks(self, replica: Replica, payload: Payload, batch: list[_Item]) -> np.ndarray | None:
        """Never hand the device more than ``max_batch_size`` rows at once. Chunks of an oversized
        request run one device call each, and stop (``None``) once every request of the batch gave up."""
        parts = []
        for chunk in row_chunks(payload, self.max_batch_size):
            if all(item.future.done() for item in batch):
                return None
            parts.append(await replica.worker.run(self._compute_halving_on_oom, replica, chunk))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _compute_halving_on_oom(self, replica: Replica, payload: Payload) -> np.ndarray:
        """Run ``compute``; on CUDA out-of-memory, halve the batch and retry each half (counted)."""
        try:
            return self.compute(replica.runner, payload)
        except torch.cuda.OutOfMemoryError:
            rows = rows_of(payload)
            if rows <= 1:
                raise
            torch.cuda.empty_cache()
            self.metrics.oom_retries.labels(self.model, replica.worker.device).inc()
            half = rows // 2
            parts = [{k: v[:half] for k, v in payload.items()}, {k: v[half:] for k, v in payload.items()}]
            return np.concatenate([self._compute_halving_on_oom(replica, p) for p in parts])

    async def _run(self, replica: Replica, batch: list[_Item], rows: int) -> None:
        now = time.monotonic()
        for item in batch:
            self.metrics.queue_duration.labels(self.model, self.task).observe(now - item.enqueued)
        keys = batch[0].payload.keys()
        payload = {k: np.concatenate([it.payload[k] for it in batch]) for k in keys}
        self.metrics.batch_size.labels(self.model, self.task).observe(rows)
        t0 = time.perf_counter()
        try:
            out = await self._compute_in_chunks(replica, payload, batch)
        except Exception as e:  # noqa: BLE001 - a failed batch fails its requests, never the consumer
            log.exception("batch of %d rows for %s/%s failed", rows, self.model, self.task)
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(e)
            return
        if out is None:  # every client left; the rest of the work was dropped
            return
        dt = time.perf_counter() - t0
        self._mean_batch_s = 0.9 * self._mean_batch_s + 0.1 * dt
        self.metrics.compute_duration.labels(self.model, self.task, replica.worker.device).observe(dt)
        start = 0
        for item in batch:
            if not item.future.done():
                item.future.set_result(out[start : start + item.rows])
            start += item.rows
