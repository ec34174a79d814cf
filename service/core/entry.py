"""A served model version as the request path sees it, in-process or behind an executor.

No torch here: the HTTP front-ends hold entries whose batchers forward to executor processes
(:mod:`service.frontend`); the executors (and the single-process server) hold entries whose
batchers compute (:mod:`service.executor.batching`). Both answer ``batcher(task).submit(...)``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from models.artifacts.manifest import Manifest
from service.errors import ClientClosed, Unavailable

Payload = dict[str, np.ndarray]  # a task's inputs by name, each with rows first


def rows_of(payload: Payload) -> int:
    """The rows of a payload (every array has the same first dimension)."""
    return len(next(iter(payload.values())))


def row_chunks(payload: Payload, step: int) -> Iterator[Payload]:
    """``payload`` in consecutive chunks of at most ``step`` rows; the payload itself when it fits in one."""
    rows = rows_of(payload)
    if rows <= step:
        yield payload
        return
    for i in range(0, rows, step):
        yield {k: v[i : i + step] for k, v in payload.items()}
Gone = Callable[[], Awaitable[bool]]  # e.g. Starlette's request.is_disconnected
GONE_POLL_S = 0.25


def watch_client(future: asyncio.Future, gone: Gone | None, what: str) -> Callable[[], None]:
    """Fail ``future`` with :class:`ClientClosed` (499) if the client leaves while it waits.

    ``gone`` is asked every ``GONE_POLL_S`` once the request has waited that long, so requests
    answered sooner never ask it (a task per request cost 12–15% of throughput). Returns the
    function that stops the watch.
    """
    if gone is None:
        return lambda: None
    loop = asyncio.get_running_loop()
    handles: list = []

    async def poll() -> None:
        while not future.done():
            if await gone():
                if not future.done():
                    future.set_exception(ClientClosed(f"the client left while its request to {what} waited"))
                return
            await asyncio.sleep(GONE_POLL_S)

    def start() -> None:
        if not future.done():
            handles.append(loop.create_task(poll()))

    handles.append(loop.call_later(GONE_POLL_S, start))

    def stop() -> None:
        for h in handles:
            h.cancel()

    return stop


class Submitter(Protocol):
    """What the inference core needs of a (model, task) batcher."""

    async def submit(self, payload: Payload, timeout_s: float, gone: Gone | None = None) -> np.ndarray: ...

# what a model's description leaves out of its calibration: the arrays behind it (the manifest has them)
BULKY_CALIBRATION = {"scores", "reference", "group_reference", "conditional_scores", "records", "known", "proposal", "patterns"}


@dataclass
class ModelEntry:
    """One served model version and its state: ``loading``, ``ready`` or ``failed``."""

    name: str
    version: str
    path: Path
    state: str = "loading"
    reason: str | None = None
    manifest: Manifest | None = None
    batchers: dict[str, Any] = field(default_factory=dict)  # task → Submitter
    devices: list[str] = field(default_factory=list)
    backend: str | None = None
    execution: dict[str, str] = field(default_factory=dict)  # per task: how it runs (service.executor.runners)
    load_seconds: float | None = None
    mtime: float = 0.0
    extras: dict = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def check_ready(self) -> None:
        """503 unless the version is ready (checked once per request, where the request first meets the entry)."""
        if not self.ready:
            raise Unavailable(f"model {self.name!r} is not ready ({self.state}: {self.reason or 'loading'})", "not_ready", 5)

    def batcher(self, task: str) -> Submitter:
        """The ``task`` batcher of a ready entry (:meth:`check_ready`)."""
        return self.batchers[task]

    def describe(self) -> dict:
        d: dict = {"name": self.name, "version": self.version, "state": self.state}
        if self.reason:
            d["reason"] = self.reason
        if self.manifest is not None:
            spec = self.manifest.data_spec
            d.update(
                architecture=self.manifest.architecture.get("name"),
                data_spec=spec.model_dump(mode="json"),
                metrics=self.manifest.metrics,
                calibration=None if self.manifest.calibration is None else self.manifest.calibration.model_dump(
                    mode="json", exclude_none=True, exclude=BULKY_CALIBRATION),
                tasks=sorted(self.batchers),
            )
        if self.devices:
            d.update(devices=list(self.devices), backend=self.backend, execution=dict(self.execution))
        if self.load_seconds is not None:
            d["load_seconds"] = round(self.load_seconds, 3)
        return d


def manifest_mtime(path: Path) -> float:
    """Modification time of the artifact's manifest (0 when absent): a changed artifact reloads."""
    m = path / "manifest.json"
    return m.stat().st_mtime if m.exists() else 0.0


class Repository(Protocol):
    """The served models as the request path reads them: in-process (:class:`service.executor.repository.ModelRepository`,
    its models computing here) or mirrored from the executors (:class:`service.frontend.RemoteRepository`).

    A repository whose models compute in other processes also has ``pattern_calibration(entry, pattern)``: the
    executor builds a missingness pattern's calibration once for every front-end (:mod:`service.core`).
    """

    models: dict[str, ModelEntry]

    def get(self, name: str) -> ModelEntry: ...

    def not_ready_reason(self) -> str | None: ...

    async def reload(self) -> dict[str, str]: ...

    async def close(self) -> None: ...
