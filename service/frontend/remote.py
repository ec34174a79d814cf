"""An HTTP front-end's view of the executors: their model tables, and batchers that hand tensors to them.

A front-end runs the FastAPI app (codecs, validation, the inference core) and holds no model:
its repository is a :class:`RemoteRepository` that mirrors the executors' model tables, and each
entry's batchers are :class:`RemoteBatcher`\\ s that hand tensors to an executor through this
process's shared-memory arena (:mod:`service.ipc.transport`). Several front-ends accept on one port
(``SO_REUSEPORT``: the kernel spreads connections over them).

When an executor dies, its connection ends at once: every request it held is answered 503 with
Retry-After, its models read "loading" until the restarted executor has loaded them again, and
the front-end itself stays up.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.artifacts.manifest import Calibration, Manifest, read_manifest
from service.core import tasks
from service.core.drift import read_table, table_path
from service.core.entry import Gone, ModelEntry, Payload, manifest_mtime, row_chunks, rows_of, watch_client
from service.errors import BadRequest, NotFound, ServiceError, Unavailable
from service.heap import freeze_heap
from service.ipc.children import ChildSpec
from service.ipc.messages import Answer, BuildPattern, Cancel, Cancelled, Codec, Done, DriftAction, DriftReadings, Failed
from service.ipc.messages import Hello, Message, ModelRow, PatternBuilt, Reload, Run, Table, TableAck, ToFrontend
from service.ipc.transport import Arena, Channel, Layout
from service.settings import Settings

log = logging.getLogger(__name__)

GRACE_S = 1.0  # beyond the request timeout, for the executor's own timeout answer to arrive
_RESTARTING = "executor_restart"
CODEC = Codec(ToFrontend)  # what a front-end receives


class RemoteError(ServiceError):
    """An error the executor reported, with its status, reason and headers."""

    def __init__(self, h: Failed) -> None:
        super().__init__(h.message, h.headers)
        self.status, self.reason = h.status, h.reason


@dataclass
class _Pending:
    future: asyncio.Future
    offset: int | None  # the request's region in the arena (None for control requests)
    holders: int = 2  # the waiting request and the executor's answer; the region is freed when both let go


class ExecutorLink:
    """This front-end's connection to one executor (a :class:`~service.ipc.transport.Channel`, re-made
    whenever the executor restarts) and the requests in flight on it."""

    def __init__(self, index: int, device: str, address: str, arena: Arena, on_table) -> None:  # noqa: ANN001
        self.index, self.device, self.address, self.arena = index, device, address, arena
        self.on_table = on_table  # Callable[[ExecutorLink], None]: the executor's table (or its loss) changed
        self.channel: Channel | None = None
        self.epoch: str | None = None
        self.table: Table | None = None
        self.ready: set[tuple[str, str]] = set()  # (model, version) this executor serves
        self.ever_loaded = False
        self.first_table = asyncio.Event()  # set by the executor's first table (its answer to hello)
        self.pending: dict[int, _Pending] = {}
        self.rows = 0  # rows this front-end has in flight on this executor
        self._ids = itertools.count(1)
        self._task: asyncio.Task | None = None
        self._arena_path = str(arena.path)

    def start(self) -> None:
        self._task = asyncio.create_task(self._connection())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._lost("the server is shutting down")

    @property
    def live(self) -> bool:
        """Connected, and the executor has said what it serves."""
        return self.channel is not None and self.epoch is not None

    # --- the connection ----------------------------------------------------------------------

    async def _connection(self) -> None:
        """Connect (again after every restart of the executor), say hello, and read answers until it goes."""
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(self.address)
            except OSError:  # not started yet, or restarting
                await asyncio.sleep(0.05)
                continue
            self.channel = Channel(reader, writer, CODEC)
            self.channel.post(Hello())
            try:
                while True:
                    for h in await self.channel.receive():
                        self._handle(h)
            except ConnectionError:
                pass
            was_live = self.live
            self._lost(f"the executor for {self.device} stopped; it is restarting")
            if was_live:
                log.warning("executor %d (%s) went away; its requests get 503 until it is back", self.index, self.device)
            self.on_table(self)

    def _lost(self, why: str) -> None:
        """The executor is gone: nothing it held will be answered, so answer and free everything now."""
        if self.channel is not None:
            self.channel.close()
        self.channel, self.epoch = None, None
        pending, self.pending = self.pending, {}
        for p in pending.values():
            if not p.future.done():
                p.future.set_exception(Unavailable(why, _RESTARTING, 2))
            self._release(p)

    def _handle(self, h: ToFrontend) -> None:
        if isinstance(h, Table):
            self.epoch, self.table = h.epoch, h
            self.ready = {(m.name, m.version) for m in h.models if m.state == "ready"}
            self.ever_loaded = self.ever_loaded or h.loaded
            self.first_table.set()
            self.on_table(self)
            self.channel.post(TableAck(generation=h.generation))
            return
        p = self.pending.pop(h.id, None)
        if p is None:  # an answer to a request this process already gave up and forgot
            return
        if not p.future.done():
            p.future.set_result(h)
        self._release(p)

    def _release(self, p: _Pending) -> None:
        p.holders -= 1
        if p.holders == 0 and p.offset is not None:
            self.arena.free(p.offset)

    def _post(self, msg: Message) -> None:
        """Queue ``msg`` for the executor (everything posted in one turn of the event loop leaves as one frame)."""
        if self.channel is None:
            raise Unavailable(f"the executor for {self.device} is not available; it is restarting", _RESTARTING, 2)
        self.channel.post(msg)

    # --- requests ----------------------------------------------------------------------------

    async def request(self, make: Callable[[int], Message], timeout_s: float) -> Answer:
        """A control request (:class:`Reload`, :class:`BuildPattern`, :class:`DriftAction`; ``make(id)`` builds it)
        and its answer; :class:`RemoteError` when the executor reports a failure."""
        rid = next(self._ids)
        p = self.pending[rid] = _Pending(asyncio.get_running_loop().create_future(), None)
        try:
            self._post(make(rid))
            async with asyncio.timeout(timeout_s):
                h = await p.future
        finally:
            self.pending.pop(rid, None)
        if isinstance(h, Failed):
            raise RemoteError(h)
        return h

    async def run(self, model: str, version: str, task: str, arrays: Payload, layout: Layout, timeout_s: float,
                  gone: Gone | None) -> np.ndarray:
        """Run ``task`` on ``arrays`` in the executor; the result has ``layout.output``'s shape and dtype."""
        rows = rows_of(arrays)
        if not self.live:
            raise Unavailable(f"the executor for {self.device} is not available; it is restarting", _RESTARTING, 2)
        try:
            base = await self.arena.alloc_wait(layout.nbytes, timeout_s)
        except TimeoutError:
            raise Unavailable("shared memory for requests stayed full; retry later", "queue_full", 1) from None
        for k, a in arrays.items():
            self.arena.view(layout.inputs[k], base)[...] = a
        rid = next(self._ids)
        p = self.pending[rid] = _Pending(asyncio.get_running_loop().create_future(), base)
        self.rows += rows
        unwatch = watch_client(p.future, gone, f"model {model!r}")
        try:
            if not self.live:  # it went away while we waited for room in the arena
                raise Unavailable(f"the executor for {self.device} is not available; it is restarting", _RESTARTING, 2)
            self._post(Run(id=rid, model=model, version=version, task=task, timeout_s=timeout_s, shm=self._arena_path,
                           at=base, inputs=layout.inputs, output=layout.output))
            try:
                async with asyncio.timeout(timeout_s + GRACE_S):
                    h = await p.future
            except TimeoutError:
                raise Unavailable(f"request to model {model!r} timed out after {timeout_s:g} s", "timeout", timeout_s) from None
            if isinstance(h, Done):
                return self.arena.view(layout.output, base).copy()
            if isinstance(h, Cancelled):
                raise Unavailable(f"request to model {model!r} was cancelled", "cancelled", 1)
            raise RemoteError(h)
        finally:
            unwatch()
            self.rows -= rows
            if rid in self.pending:  # we gave up first (timeout, client gone, cancelled)
                if self.live:  # the executor still holds the region: it answers the cancel, then we free it
                    self._post(Cancel(id=rid))
                else:  # nothing was or will be sent for it
                    del self.pending[rid]
                    self._release(p)
            self._release(p)


class RemoteBatcher:
    """A (model, version, task) of the executors, with the in-process batcher's ``submit``."""

    def __init__(self, repository: RemoteRepository, model: str, version: str, task: str, manifest: Manifest) -> None:
        self.repository, self.model, self.version, self.task, self.manifest = repository, model, version, task, manifest

    async def submit(self, payload: Payload, timeout_s: float, gone: Gone | None = None) -> np.ndarray:
        """Rows of ``payload`` → their results, through the least-loaded executor serving this version.
        A request larger than a quarter of the arena goes in row chunks (rows never depend on each other)."""
        links = self.repository.serving(self.model, self.version)
        if not links:
            raise Unavailable(f"model {self.model!r} is not ready on any executor (restarting?)", "not_ready", 2)
        link = links[0] if len(links) == 1 else min(links, key=lambda link: link.rows)
        rows = rows_of(payload)
        out_shape, out_dtype = tasks.output_of(self.task, self.manifest, rows)
        layout = Layout.plan(payload, out_shape, out_dtype)
        quarter = link.arena.size // 4
        if layout.nbytes <= quarter:
            return await link.run(self.model, self.version, self.task, payload, layout, timeout_s, gone)
        row_bytes = -(-layout.nbytes // rows)
        if row_bytes > link.arena.size // 2:
            raise BadRequest(f"one row needs about {row_bytes} bytes of shared memory; the arena holds {link.arena.size} "
                             "(raise FLOWSERVE_SHM_ARENA_MB)")
        step = max(1, quarter // row_bytes)
        parts: list[asyncio.Task] = []
        try:
            async with asyncio.TaskGroup() as group:
                for chunk in row_chunks(payload, step):
                    shape, _ = tasks.output_of(self.task, self.manifest, rows_of(chunk))
                    parts.append(group.create_task(link.run(self.model, self.version, self.task, chunk,
                                                            Layout.plan(chunk, shape, out_dtype), timeout_s, gone)))
        except* ServiceError as eg:
            raise eg.exceptions[0] from None
        return np.concatenate([t.result() for t in parts])


class RemoteRepository:
    """The models the executors serve, as one repository: what the inference core and the API read."""

    def __init__(self, settings: Settings, spec: ChildSpec) -> None:
        self.settings, self.spec = settings, spec
        self.models: dict[str, ModelEntry] = {}
        self.loaded_once = asyncio.Event()
        self._serving: dict[tuple[str, str], list[ExecutorLink]] = {}
        self._read_new = False
        self._manifests: dict[tuple[str, float], Manifest] = {}
        name = f"frontend-{spec.index}-{os.getpid()}"
        self.arena = Arena.create(Path(spec.shm_dir) / name, settings.shm_arena_mb << 20)
        self.links = [ExecutorLink(i, d, spec.executor_address(i), self.arena, self._update) for i, d in enumerate(spec.devices)]

    def start(self) -> None:
        for link in self.links:
            link.start()

    async def first_tables(self, timeout_s: float) -> None:
        """Wait until every executor has sent its table (at most ``timeout_s``: an executor that is
        loading or restarting must not keep this front-end's health routes off the port)."""
        waits = [asyncio.create_task(link.first_table.wait()) for link in self.links]
        _, late = await asyncio.wait(waits, timeout=timeout_s)
        for t in late:
            t.cancel()
        if late:
            log.warning("%d executor(s) have not answered in %.0f s; serving without their tables", len(late), timeout_s)

    async def close(self) -> None:
        for link in self.links:
            await link.close()
        self.arena.close(unlink=True)

    def get(self, name: str) -> ModelEntry:
        try:
            return self.models[name]
        except KeyError:
            if not self.loaded_once.is_set():  # not "unknown" before the executors have said what they serve
                raise Unavailable("models are still loading", "not_ready", 2) from None
            raise NotFound(f"unknown model {name!r}; available: {', '.join(sorted(self.models)) or 'none'}") from None

    def serving(self, name: str, version: str) -> list[ExecutorLink]:
        """The executors serving ``name`` at ``version`` now (kept up to date by :meth:`_update`)."""
        return self._serving.get((name, version), [])

    def not_ready_reason(self) -> str | None:
        if not self.loaded_once.is_set():
            return "models are still loading"
        if not any(link.live for link in self.links):
            return "every model executor is restarting"
        return None

    async def pattern_calibration(self, entry: ModelEntry, pattern: tuple[int, ...]) -> Calibration:
        """A missingness pattern's calibration (:func:`models.anomaly.scoring.pattern_calibration`), built by an executor
        serving ``entry`` (chosen by the pattern, so a server with several executors builds each pattern once) and
        shared by every front-end that asks."""
        links = [link for link in self.serving(entry.name, entry.version) if link.live]
        if not links:
            raise Unavailable(f"no executor serves model {entry.name!r} now; it is restarting", _RESTARTING, 2)
        link = links[hash(pattern) % len(links)]
        h = await link.request(lambda rid: BuildPattern(id=rid, model=entry.name, version=entry.version, pattern=pattern),
                               self.settings.request_timeout_s)
        if not isinstance(h, PatternBuilt):
            raise Unavailable(f"the pattern calibration for model {entry.name!r} was cancelled", "cancelled", 1)
        return Calibration.model_validate(h.calibration)

    async def drift(self, entry: ModelEntry, action: str, stream: str | None = None, p: np.ndarray | None = None,
                    n: np.ndarray | None = None, units: np.ndarray | None = None) -> list[dict]:
        """A drift action (:meth:`service.core.InferenceCore.drift`) on the executor that holds ``entry``'s drift state:
        the lowest-numbered live executor serving it, the same one from every front-end (:mod:`service.core.drift`)."""
        links = [link for link in self.serving(entry.name, entry.version) if link.live]
        if not links:
            raise Unavailable(f"no executor serves model {entry.name!r} now; it is restarting", _RESTARTING, 2)
        link = min(links, key=lambda k: k.index)
        def msg(rid: int) -> DriftAction:
            return DriftAction(id=rid, action=action, model=entry.name, version=entry.version, stream=stream,
                               p=None if p is None else p.tolist(), n=None if n is None else n.tolist(),
                               units=None if units is None else units.tolist())

        h = await link.request(msg, self.settings.request_timeout_s)
        if not isinstance(h, DriftReadings):
            raise Unavailable(f"the drift update for model {entry.name!r} was cancelled", "cancelled", 1)
        return h.readings

    def drift_rows(self) -> list[tuple[str, str, dict]]:
        """Every tracked drift stream of every executor, for ``/metrics``: read from the table each executor keeps in the
        server's run directory (:func:`service.core.drift.table_path`), so a scrape never waits on a busy executor."""
        rows: list[tuple[str, str, dict]] = []
        for i in range(len(self.links)):
            rows.extend(read_table(table_path(self.spec.shm_dir, i)))
        return rows

    async def reload(self) -> dict[str, str]:
        """Reload every executor; answers once every front-end routes to what they now serve."""
        live = [link for link in self.links if link.live]
        if not live:
            raise Unavailable("no model executor is available; retry", _RESTARTING, 2)
        answers = await asyncio.gather(*(link.request(lambda rid: Reload(id=rid), 600) for link in live))
        changes: dict[str, str] = {}
        for link, h in zip(live, answers):
            for name, what in h.changes.items():
                changes[name] = what if changes.get(name, what) == what or len(live) == 1 else f"{changes[name]}; {link.device}: {what}"
        return changes

    # --- the table ---------------------------------------------------------------------------

    def _manifest(self, path: str, mtime: float) -> Manifest:
        key = (path, mtime)
        if key not in self._manifests:
            self._manifests[key] = read_manifest(path)
            self._read_new = True
        return self._manifests[key]

    def _update(self, _link: ExecutorLink) -> None:
        """Rebuild the model entries from every executor's table (keeping what each entry cached)."""
        down = [link for link in self.links if not link.live]
        seen: dict[str, list[tuple[ExecutorLink, ModelRow]]] = {}
        for link in self.links:
            if link.live:
                for m in link.table.models:
                    seen.setdefault(m.name, []).append((link, m))
        models: dict[str, ModelEntry] = {}
        for name, rows in seen.items():
            ready = [(link, m) for link, m in rows if m.state == "ready"]
            if ready:
                top = max(int(m.version) for _, m in ready)
                chosen = [(link, m) for link, m in ready if int(m.version) == top]
            else:
                chosen = rows[:1]
            m = chosen[0][1]
            state, reason = m.state, m.reason
            if not ready and down:
                state, reason = "loading", f"the executor for {', '.join(link.device for link in down)} is restarting"
            models[name] = self._entry(m, state, reason, [d for _, mm in chosen for d in mm.devices] if ready else [])
        for name, old in self.models.items():  # models of an executor that is restarting come back with it
            if name not in models and down:
                old.state, old.reason = "loading", f"the executor for {', '.join(link.device for link in down)} is restarting"
                models[name] = old
        self.models = models
        serving: dict[tuple[str, str], list[ExecutorLink]] = {}
        for link in self.links:
            if link.live:
                for key in link.ready:
                    serving.setdefault(key, []).append(link)
        self._serving = serving
        if all(link.ever_loaded for link in self.links):
            self.loaded_once.set()
        if self._read_new:  # manifests (calibrations can be large) live as long as their model
            self._read_new = False
            freeze_heap()

    def _entry(self, m: ModelRow, state: str, reason: str | None, devices: list[str]) -> ModelEntry:
        path = Path(m.path)
        old = self.models.get(m.name)
        if not (old and old.version == m.version and old.path == path and old.mtime == m.mtime and old.manifest is not None):
            old = ModelEntry(name=m.name, version=m.version, path=path, mtime=m.mtime)
            if m.state != "loading":
                try:
                    old.manifest = self._manifest(m.path, manifest_mtime(path))
                except Exception as e:  # noqa: BLE001 - unreadable here: unavailable here (a failed model keeps its reason)
                    if m.state == "ready":
                        state, reason = "failed", f"manifest unreadable by the front-end: {e}"
            if old.manifest is not None:
                old.batchers = {t: RemoteBatcher(self, m.name, m.version, t, old.manifest) for t in tasks.TASKS}
        old.state, old.reason = state, reason
        old.devices, old.backend, old.load_seconds = devices, m.backend, m.load_seconds
        old.execution = m.execution
        return old
