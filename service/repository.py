"""The model repository on disk: ``<root>/<name>/<version>/`` artifact directories.

Each model name serves its highest numeric version. A model that fails to load is listed with
its reason and answers 503; it never takes the server down. ``reload()`` loads new or changed
versions in the background, warms them, swaps them in atomically and drains the old ones.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from models.artifact import Manifest, read_manifest

from . import tasks
from .batching import Batcher, Replica
from .errors import NotFound, Unavailable
from .metrics import Metrics
from .runners import Runner, open_runner
from .settings import Settings
from .workers import DeviceWorker

log = logging.getLogger(__name__)


@dataclass
class ModelEntry:
    """One served model version and its state: ``loading``, ``ready`` or ``failed``."""

    name: str
    version: str
    path: Path
    state: str = "loading"
    reason: str | None = None
    manifest: Manifest | None = None
    runners: list[Runner] = field(default_factory=list)
    batchers: dict[str, Batcher] = field(default_factory=dict)
    load_seconds: float | None = None
    mtime: float = 0.0
    extras: dict = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def batcher(self, task: str) -> Batcher:
        if not self.ready:
            raise Unavailable(f"model {self.name!r} is not ready ({self.state}: {self.reason or 'loading'})", "not_ready", 5)
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
                calibration=None if not self.manifest.calibration else
                {k: v for k, v in self.manifest.calibration.items() if k not in ("scores", "reference")},
                tasks=sorted(self.batchers),
            )
        if self.runners:
            d.update(devices=[r.device for r in self.runners], backend=self.runners[0].backend)
        if self.load_seconds is not None:
            d["load_seconds"] = round(self.load_seconds, 3)
        return d


def _versions(model_dir: Path) -> list[Path]:
    return sorted((p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def _mtime(path: Path) -> float:
    m = path / "manifest.json"
    return m.stat().st_mtime if m.exists() else 0.0


class ModelRepository:
    """Loads, serves and reloads the models under ``settings.repository``."""

    def __init__(self, settings: Settings, workers: list[DeviceWorker], metrics: Metrics) -> None:
        self.settings = settings
        self.root = Path(settings.repository)
        self.workers = workers
        self.metrics = metrics
        self.models: dict[str, ModelEntry] = {}
        self._lock = asyncio.Lock()
        self.loaded_once = asyncio.Event()

    def get(self, name: str) -> ModelEntry:
        try:
            return self.models[name]
        except KeyError:
            raise NotFound(f"unknown model {name!r}; available: {', '.join(sorted(self.models)) or 'none'}") from None

    def scan(self) -> dict[str, Path]:
        """``{name: path of its highest version}`` on disk."""
        if not self.root.is_dir():
            log.warning("model repository %s does not exist", self.root)
            return {}
        found = {}
        for model_dir in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            versions = _versions(model_dir)
            if versions:
                found[model_dir.name] = versions[-1]
        return found

    async def _load(self, name: str, path: Path) -> ModelEntry:
        entry = ModelEntry(name=name, version=path.name, path=path, mtime=_mtime(path))
        t0 = time.perf_counter()
        try:
            entry.manifest = read_manifest(path)
            runners = await asyncio.gather(*(w.run(open_runner, path, w.device, self.settings) for w in self.workers))
            for w, r in zip(self.workers, runners):
                await w.run(tasks.warm, r)
            entry.runners = list(runners)
            replicas = [Replica(w, r) for w, r in zip(self.workers, runners)]
            entry.batchers = {
                task: Batcher(name, task, fn, replicas, self.metrics, self.settings.max_batch_size,
                              self.settings.max_queue_delay_ms / 1000, self.settings.max_queue_rows)
                for task, fn in tasks.TASKS.items()
            }
            for b in entry.batchers.values():
                b.start()
            entry.state = "ready"
        except Exception as e:  # noqa: BLE001 - any failure marks this model failed, not the server
            log.error("model %s version %s failed to load: %s", name, path.name, e)
            entry.state, entry.reason = "failed", str(e).splitlines()[0] if str(e) else type(e).__name__
        entry.load_seconds = time.perf_counter() - t0
        self.metrics.load_duration.labels(name, entry.version).set(entry.load_seconds)
        return entry

    async def reload(self) -> dict[str, str]:
        """Load what is new or changed, swap atomically, drain and stop what it replaces."""
        async with self._lock:
            on_disk = self.scan()
            changes: dict[str, str] = {}
            for name, path in on_disk.items():
                old = self.models.get(name)
                if old and old.path == path and old.mtime == _mtime(path) and old.state != "failed":
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
                    asyncio.create_task(self._drain(old))
            for name in set(self.models) - set(on_disk):
                old = self.models.pop(name)
                self._set_ready_metric(None, old)
                changes[name] = "removed"
                asyncio.create_task(self._drain(old))
            self.loaded_once.set()
            return changes

    def _set_ready_metric(self, new: ModelEntry | None, old: ModelEntry | None) -> None:
        if old is not None:
            self.metrics.model_ready.labels(old.name, old.version).set(0)
        if new is not None:
            self.metrics.model_ready.labels(new.name, new.version).set(1 if new.ready else 0)

    async def _drain(self, entry: ModelEntry, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while any(not b.idle for b in entry.batchers.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for b in entry.batchers.values():
            await b.stop()

    async def close(self) -> None:
        for entry in list(self.models.values()):
            for b in entry.batchers.values():
                await b.stop()
