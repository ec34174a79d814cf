"""The model repository on disk: ``<root>/<name>/<version>/`` artifact directories.

Each model name serves its highest numeric version. A model that fails to load is listed with
its reason and answers 503; it never takes the server down. ``reload()`` loads new or changed
versions in the background, warms them, swaps them in atomically and drains the old ones.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

from models.artifacts.manifest import read_manifest
from service.core import tasks
from service.core.entry import ModelEntry, manifest_mtime
from service.errors import NotFound, Unavailable
from service.executor import compute
from service.executor.batching import AUTO_DELAY_PROBE_ROWS, Batcher, QueueWait, Replica, auto_queue_wait, describe
from service.executor.compute import check_batch_invariance
from service.executor.runners import open_runner
from service.executor.selfcheck import DeviceFault, Quarantine
from service.executor.workers import DeviceWorker
from service.heap import freeze_heap
from service.ipc.messages import ModelRow
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger(__name__)


def versions(model_dir: Path) -> list[Path]:
    """A model directory's numbered version directories, lowest first."""
    return sorted((p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


class ModelRepository:
    """Loads, serves and reloads the models under ``settings.repository``."""

    def __init__(self, settings: Settings, workers: list[DeviceWorker], metrics: Metrics, quarantine: Quarantine | None = None,
                 on_device_fault: Callable[[], None] | None = None) -> None:
        """``quarantine``: paths that faulted the device, kept across restarts of this process; ``on_device_fault``:
        what to do when a self-check poisons the device (an executor exits for the supervisor to restart it)."""
        self.settings = settings
        self.quarantine = quarantine
        self.on_device_fault = on_device_fault
        self.root = Path(settings.repository)
        self.workers = workers
        self.metrics = metrics
        self.models: dict[str, ModelEntry] = {}
        self._draining: dict[tuple[str, str], ModelEntry] = {}  # replaced versions still finishing their work
        self._lock = asyncio.Lock()
        self.loaded_once = asyncio.Event()

    def get(self, name: str) -> ModelEntry:
        try:
            return self.models[name]
        except KeyError:
            raise NotFound(f"unknown model {name!r}; available: {', '.join(sorted(self.models)) or 'none'}") from None

    def get_version(self, name: str, version: str) -> ModelEntry:
        """The entry serving ``name`` at ``version``: the current one, or a replaced one still draining
        (a front-end may send work for the version it knew a moment before a reload)."""
        entry = self.models.get(name)
        if entry is not None and entry.version == version:
            return entry
        old = self._draining.get((name, version))
        if old is not None:
            return old
        current = self.get(name)
        raise Unavailable(f"model {name!r} version {version} was replaced by version {current.version}; retry", "not_ready", 1)

    def not_ready_reason(self) -> str | None:
        """Why the server is not ready (``None`` when it is): the first load has not finished."""
        return None if self.loaded_once.is_set() else "models are still loading"

    def table(self) -> list[ModelRow]:
        """What a front-end needs to know of each served model."""
        return [ModelRow(name=e.name, version=e.version, path=str(e.path), state=e.state, reason=e.reason,
                         load_seconds=e.load_seconds, mtime=e.mtime, devices=e.devices, backend=e.backend, execution=e.execution)
                for e in self.models.values()]

    def scan(self) -> dict[str, Path]:
        """``{name: path of its highest version}`` on disk."""
        if not self.root.is_dir():
            log.warning("model repository %s does not exist", self.root)
            return {}
        found = {}
        for model_dir in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            numbered = versions(model_dir)
            if numbered:
                found[model_dir.name] = numbered[-1]
        if not found:
            log.warning("model repository %s holds no model (each is a directory <name>/<version>/, the version a number)", self.root)
        return found

    async def _load(self, name: str, path: Path) -> ModelEntry:
        entry = ModelEntry(name=name, version=path.name, path=path, mtime=manifest_mtime(path))
        t0 = time.perf_counter()
        try:
            entry.manifest = read_manifest(path)
            runners = await asyncio.gather(*(w.run(open_runner, path, w.device, self.settings, self.quarantine) for w in self.workers))
            for r in runners:  # paths that failed their self-check (service.executor.selfcheck), counted once per load
                for f in getattr(r, "fallbacks", []):
                    self.metrics.fallbacks.labels(name, f.task, f.reason).inc()
            for w, r in zip(self.workers, runners):
                await w.run(compute.warm, r)
                await w.run(check_batch_invariance, r, self.settings)
            entry.devices, entry.backend = [r.device for r in runners], runners[0].backend
            entry.execution = dict(runners[0].execution)
            replicas = [Replica(w, r) for w, r in zip(self.workers, runners)]
            waits = await self._queue_waits(name, replicas[0])
            for task, wait in waits.items():
                if wait.delay_s > 0:
                    entry.execution[task] = f"{entry.execution.get(task, task)}; {describe(wait)}"
            entry.batchers = {
                task: Batcher(name, task, fn, replicas, self.metrics, self.settings.max_batch_size, waits[task],
                              self.settings.max_queue_rows)
                for task, fn in compute.COMPUTE.items()
            }
            for b in entry.batchers.values():
                b.start()
            entry.state = "ready"
        except Exception as e:  # noqa: BLE001 - any failure marks this model failed, not the server
            if isinstance(e, DeviceFault):
                self.metrics.fallbacks.labels(name, e.fallback.task, e.fallback.reason).inc()
                if self.on_device_fault is not None:
                    log.error("model %s version %s: %s; the device context is unusable, restarting without that path",
                              name, path.name, e.fallback.describe())
                    self.on_device_fault()
            log.error("model %s version %s failed to load: %s", name, path.name, e)
            entry.state, entry.reason = "failed", str(e).splitlines()[0] if str(e) else type(e).__name__
        entry.load_seconds = time.perf_counter() - t0
        self.metrics.load_duration.labels(name, entry.version).set(entry.load_seconds)
        return entry

    async def _queue_waits(self, name: str, replica: Replica) -> dict[str, QueueWait]:
        """How each task's batches wait to fill: the setting, or under ``auto`` from call costs measured
        on ``replica`` (:func:`~service.executor.batching.auto_queue_wait`)."""
        setting = self.settings.max_queue_delay_ms
        if setting != "auto":
            return {task: QueueWait(setting / 1000) for task in tasks.TASKS}
        probe = min(AUTO_DELAY_PROBE_ROWS, self.settings.max_batch_size)
        if probe < 2:  # batches of one row: nothing to wait for
            return {task: QueueWait() for task in tasks.TASKS}
        waits = {}
        for task in tasks.TASKS:
            one = await replica.worker.run(compute.call_seconds, replica.runner, task, 1, 3)
            many = await replica.worker.run(compute.call_seconds, replica.runner, task, probe, 2)
            waits[task] = auto_queue_wait(one, many, probe)
            log.info("model %s, %s: %.2f ms a call at 1 row, %.2f ms at %d: %s", name, task, one * 1000, many * 1000, probe,
                     describe(waits[task]) if waits[task].delay_s > 0 else "batches do not wait")
        return waits

    async def reload(self) -> dict[str, str]:
        """Load what is new or changed, swap atomically, drain and stop what it replaces."""
        async with self._lock:
            on_disk = self.scan()
            changes: dict[str, str] = {}
            for name, path in on_disk.items():
                old = self.models.get(name)
                if old and old.path == path and old.mtime == manifest_mtime(path) and old.state != "failed":
                    continue
                if old is None:
                    self.models[name] = ModelEntry(name=name, version=path.name, path=path)
                new = await self._load(name, path)
                if old is not None and old.ready and not new.ready:
                    changes[name] = f"kept version {old.version}; version {new.version} failed: {new.reason}"
                    continue
                self.models[name] = new
                self._set_ready_metric(new, old)
                changes[name] = f"{new.state} version {new.version}"
                if old is not None and old.batchers:
                    self._retire(old)
            for name in set(self.models) - set(on_disk):
                old = self.models.pop(name)
                self._set_ready_metric(None, old)
                changes[name] = "removed"
                self._retire(old)
            self.loaded_once.set()
            freeze_heap()  # the models just loaded are long-lived
            return changes

    def _set_ready_metric(self, new: ModelEntry | None, old: ModelEntry | None) -> None:
        if old is not None:
            self.metrics.model_ready.labels(old.name, old.version).set(0)
        if new is not None:
            self.metrics.model_ready.labels(new.name, new.version).set(1 if new.ready else 0)

    def _retire(self, entry: ModelEntry) -> None:
        """Keep a replaced entry reachable by its version while its queued work finishes, then stop it."""
        key = (entry.name, entry.version)
        if self.models.get(entry.name) is not entry:
            self._draining[key] = entry
        asyncio.create_task(self._drain(entry, key))

    async def _drain(self, entry: ModelEntry, key: tuple[str, str], timeout_s: float = 30.0, grace_s: float = 2.0) -> None:
        """Stop ``entry`` once its queues are empty, after at least ``grace_s`` (front-ends learn of
        the new version within milliseconds; work they sent for the old one meanwhile is served)."""
        try:
            start = time.monotonic()
            while time.monotonic() < start + timeout_s and (time.monotonic() < start + grace_s
                                                             or any(not b.idle for b in entry.batchers.values())):
                await asyncio.sleep(0.05)
        finally:
            if self._draining.get(key) is entry:
                del self._draining[key]
        for b in entry.batchers.values():
            await b.stop()

    async def close(self) -> None:
        for entry in list(self.models.values()):
            for b in entry.batchers.values():
                await b.stop()
