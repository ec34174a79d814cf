"""The batcher's own logic with a scripted runner: chunking, OOM halving, results per request."""

from __future__ import annotations

import asyncio

import numpy as np
import torch

from service.batching import Batcher, Replica
from service.errors import Unavailable
from service.metrics import Metrics
from service.workers import DeviceWorker


class ScriptedRunner:
    """Doubles each row; raises CUDA out-of-memory for batches above ``oom_above`` rows."""

    def __init__(self, oom_above: int | None = None) -> None:
        self.oom_above = oom_above
        self.batches: list[int] = []


def compute(runner: ScriptedRunner, payload: dict[str, np.ndarray]) -> np.ndarray:
    rows = len(payload["x"])
    if runner.oom_above is not None and rows > runner.oom_above:
        raise torch.cuda.OutOfMemoryError("scripted")
    runner.batches.append(rows)
    return payload["x"][:, 0] * 2


def run(runner: ScriptedRunner, requests: list[int], max_batch: int, max_queue_rows: int = 10_000) -> tuple[list, Metrics]:
    metrics = Metrics()

    async def main() -> list:
        worker = DeviceWorker("cpu")
        b = Batcher("m", "score", compute, [Replica(worker, runner)], metrics, max_batch, 0.0, max_queue_rows)
        b.start()
        start = 0
        jobs = []
        for n in requests:
            jobs.append(b.submit({"x": np.arange(start, start + n, dtype=np.float64)[:, None]}, 10))
            start += n
        out = await asyncio.gather(*jobs, return_exceptions=True)
        await b.stop()
        worker.shutdown()
        return out

    return asyncio.run(main()), metrics


def test_each_request_gets_its_own_rows() -> None:
    out, _ = run(ScriptedRunner(), [3, 1, 5, 2], max_batch=4)
    expected = np.arange(11) * 2.0
    np.testing.assert_array_equal(np.concatenate(out), expected)
    assert [len(o) for o in out] == [3, 1, 5, 2]


def test_oversized_request_is_split_into_max_batch_chunks() -> None:
    runner = ScriptedRunner()
    out, _ = run(runner, [10], max_batch=4)
    assert runner.batches == [4, 4, 2]
    np.testing.assert_array_equal(out[0], np.arange(10) * 2.0)


def test_out_of_memory_halves_the_batch_and_is_counted() -> None:
    runner = ScriptedRunner(oom_above=2)
    out, metrics = run(runner, [8], max_batch=8)
    np.testing.assert_array_equal(out[0], np.arange(8) * 2.0)
    assert max(runner.batches) <= 2 and sum(runner.batches) == 8
    assert metrics.oom_retries.labels("m", "cpu")._value.get() >= 3


def test_full_queue_rejects_with_retry_after() -> None:
    out, metrics = run(ScriptedRunner(), [6, 6], max_batch=4, max_queue_rows=8)
    rejected = [o for o in out if isinstance(o, Unavailable)]
    assert len(rejected) == 1 and rejected[0].reason == "queue_full" and "Retry-After" in rejected[0].headers
    assert metrics.rejections.labels("m", "queue_full")._value.get() == 1


def test_single_row_out_of_memory_fails_only_that_request() -> None:
    out, _ = run(ScriptedRunner(oom_above=0), [1], max_batch=4)
    assert isinstance(out[0], torch.cuda.OutOfMemoryError)
