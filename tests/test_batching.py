"""The batcher's own logic with a scripted runner: chunking, OOM halving, results per request."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch

from service.errors import Unavailable
from service.executor.batching import AUTO_DELAY_CAP_S, AUTO_DELAY_PROBE_ROWS, Batcher, QueueWait, Replica, auto_queue_wait, describe
from service.executor.workers import DeviceWorker
from service.metrics import Metrics


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
        b = Batcher("m", "score", compute, [Replica(worker, runner)], metrics, max_batch, QueueWait(), max_queue_rows)
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


def test_auto_wait_for_fixed_cost_calls_only() -> None:
    w = auto_queue_wait(0.004, 0.0053, 16)  # 16 rows cost little more than 1: wait up to the fixed cost, under load
    per_row = 0.0013 / 15
    assert w.from_rows == 16 and abs(w.delay_s - (0.004 - per_row)) < 1e-12
    assert w.until_rows == 46  # the rows whose cost equals the fixed cost: ceil(0.003913 / 0.0000867) = ceil(45.15)
    assert auto_queue_wait(0.5, 0.6, 16).delay_s == AUTO_DELAY_CAP_S  # never more than the cap
    assert auto_queue_wait(0.01, 0.01, 16).until_rows is None  # flat cost (tiles): fill up to the batch size
    assert auto_queue_wait(0.0004, 0.0015, 16) == QueueWait()  # cost grows with rows: no wait
    assert describe(w) == "batches wait up to 3.9 ms after batches of 16+ rows, below 46 rows"


def test_delay_under_load_only_never_holds_a_lone_request_and_fills_batches_under_load() -> None:
    """``from_rows=2`` with a delay far beyond the test's bounds: a lone request still runs at
    once; after a batch of two rows, the next batch waits until it is full."""
    runner, metrics = ScriptedRunner(), Metrics()

    async def main() -> None:
        worker = DeviceWorker("cpu")
        b = Batcher("m", "score", compute, [Replica(worker, runner)], metrics, 2, QueueWait(600.0, from_rows=2), 100)
        b.start()

        def one(v: float):  # noqa: ANN202
            return b.submit({"x": np.array([[v]])}, 30)

        out = await asyncio.wait_for(one(1.0), 10)  # a 600 s wait would time this out
        np.testing.assert_array_equal(out, [2.0])
        both = await asyncio.wait_for(asyncio.gather(one(2.0), one(3.0)), 10)  # queued together: one batch of two
        assert [o.tolist() for o in both] == [[4.0], [6.0]]
        assert runner.batches == [1, 2]
        third = asyncio.ensure_future(one(4.0))
        depth = lambda: metrics.registry.get_sample_value("flowserve_queue_depth_rows", {"model": "m", "task": "score"})  # noqa: E731
        while depth() != 1:  # queued
            await asyncio.sleep(0)
        while depth() != 0:  # taken into a batch, which waits to fill: the last batch had two rows
            await asyncio.sleep(0)
        assert not third.done() and runner.batches == [1, 2]  # and the end proves it shared the fourth's batch
        fourth = await asyncio.wait_for(one(5.0), 10)  # fills the batch of two, which then runs at once
        assert fourth.tolist() == [10.0] and (await third).tolist() == [8.0]
        assert runner.batches == [1, 2, 2]
        await b.stop()
        filling = Batcher("m", "score", compute, [Replica(worker, runner)], metrics, 4, QueueWait(600.0, until_rows=2), 100)
        filling.start()
        pair = await asyncio.wait_for(asyncio.gather(*(filling.submit({"x": np.array([[v]])}, 30) for v in (6.0, 7.0))), 10)
        assert [o.tolist() for o in pair] == [[12.0], [14.0]] and runner.batches == [1, 2, 2, 2]  # 2 rows: no wait for 4
        await filling.stop()
        worker.shutdown()

    asyncio.run(main())


def test_repository_wires_the_queue_delay_setting_into_every_batcher(repository: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``auto`` (the default): each task's wait is :func:`auto_queue_wait` of the call costs measured
    at load, said in the model's ``execution``; a number: that delay, always.

    The wiring is checked twice: with call costs scripted (a mostly fixed cost for ``score``, one that
    grows with the rows for ``sample``), so both outcomes are exercised whatever this machine's speed;
    and with the real measurement, whose outcome depends on the machine and is checked for consistency.
    """
    from service.core import tasks
    from service.executor import compute
    from service.executor.repository import ModelRepository
    from service.settings import Settings

    async def load(delay: str) -> dict:
        worker = DeviceWorker("cpu")
        repo = ModelRepository(Settings(repository=repository, backend="torch", max_queue_delay_ms=delay), [worker], Metrics())
        try:
            await repo.reload()
            entry = repo.get("digits")
            return {t: (b.wait, entry.execution[t]) for t, b in entry.batchers.items()}
        finally:
            await repo.close()
            worker.shutdown()

    for task, (wait, execution) in asyncio.run(load("auto")).items():  # real timings: either outcome
        assert wait == QueueWait() or (wait.from_rows == AUTO_DELAY_PROBE_ROWS and 0 < wait.delay_s <= AUTO_DELAY_CAP_S), task
        assert ("ms after batches of 16+ rows" in execution) == (wait.delay_s > 0), execution

    costs = {"score": lambda rows: 0.004 + 1e-4 * rows, "sample": lambda rows: 4e-4 * rows}  # seconds a call
    probed: list[tuple[str, int]] = []

    def scripted(runner: object, task: str, rows: int, repeats: int) -> float:
        probed.append((task, rows))
        return costs[task](rows)

    monkeypatch.setattr(compute, "call_seconds", scripted)
    waits = asyncio.run(load("auto"))
    assert sorted(probed) == sorted((t, r) for t in tasks.TASKS for r in (1, AUTO_DELAY_PROBE_ROWS))
    expected = auto_queue_wait(costs["score"](1), costs["score"](16))
    assert waits["score"][0] == expected and (expected.from_rows, expected.until_rows) == (16, 40), waits["score"]
    assert abs(expected.delay_s - 0.004) < 1e-9, expected
    assert waits["score"][1].endswith("; batches wait up to 4.0 ms after batches of 16+ rows, below 40 rows"), waits["score"]
    assert waits["sample"][0] == QueueWait() and "wait" not in waits["sample"][1], waits["sample"]

    for task, (wait, execution) in asyncio.run(load("5")).items():
        assert wait == QueueWait(0.005) and execution.endswith("; batches wait up to 5.0 ms"), (task, execution)
