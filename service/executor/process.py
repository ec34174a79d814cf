"""The model-executor process: one per device, owner of its models, batchers and compute.

It loads the repository onto its device (:class:`~service.executor.repository.ModelRepository`, the
same code the single-process server runs), and serves each front-end over its own Unix-socket
connection (:class:`~service.ipc.transport.Channel`), in the typed messages of
:mod:`service.ipc.messages`. A :class:`~service.ipc.messages.Run` names a model version, a task and
where its tensors lie in the sending front-end's shared-memory arena; the executor copies the
inputs out, submits them to that model's batcher, where rows from every front-end form batches
together, writes the result into the arena and answers :class:`~service.ipc.messages.Done` (or
:class:`~service.ipc.messages.Failed` / :class:`~service.ipc.messages.Cancelled`).

The model table (each model's version, state and reason) goes to every connected front-end,
again after each reload; a reload answers only once every front-end acknowledged the new table,
so after ``POST /v1/repository/reload`` returns, every front-end routes to the new versions.
SIGHUP reloads. SIGTERM (sent by the supervisor once the front-ends have drained) finishes
in-flight work and exits. A device fault that leaves the device unusable
(a CUDA error other than out-of-memory) ends the process with :data:`EXIT_DEVICE_FAULT`, and
the supervisor starts a new one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np

from service.core.drift import TABLE_EVERY_S, table_path, write_table
from service.errors import BadRequest, ServiceError
from service.executor.selfcheck import Quarantine, is_device_fault
from service.heap import apply_heap_settings, trim_malloc_every
from service.ipc.children import EXIT_DEVICE_FAULT, ChildSpec, child_logging, die_with_parent, read_child_spec
from service.ipc.messages import Answer, BuildPattern, Cancel, Cancelled, Codec, Done, DriftAction, DriftReadings, Failed
from service.ipc.messages import Hello, PatternBuilt, Reload, Reloaded, Run, Table, TableAck, ToExecutor
from service.ipc.transport import Arena, Channel
from service.metrics import Metrics

log = logging.getLogger(__name__)

ACK_TIMEOUT_S = 2.0


class Executor:
    """The executor's state and message handlers (one instance per process)."""

    def __init__(self, spec: ChildSpec) -> None:
        import torch

        from service.core.inference import InferenceCore
        from service.executor.repository import ModelRepository
        from service.executor.workers import DeviceWorker

        self.spec = spec
        self.settings = s = spec.settings
        self.device = spec.devices[spec.index]
        if self.device == "cpu":
            torch.set_num_threads(s.torch_threads or max(1, _cores() - (s.http_workers or 1)))
        self.metrics = Metrics()
        if spec.incarnation > 0:
            self.metrics.executor_restarts.labels(self.device).inc()
        self.worker = DeviceWorker(self.device, inline=True)
        quarantine = Quarantine(Path(spec.shm_dir) / f"quarantine-{spec.index}.json")  # survives this process's restarts
        self.repository = ModelRepository(s, [self.worker], self.metrics, quarantine,
                                          on_device_fault=lambda: os._exit(EXIT_DEVICE_FAULT))
        self.core = InferenceCore(s, self.repository, self.metrics)  # builds pattern calibrations for every front-end
        self.epoch = f"{os.getpid()}.{spec.incarnation}"
        self.arenas: dict[str, tuple[Arena, Channel]] = {}  # path → the arena and the front-end it belongs to
        self.peers: set[Channel] = set()
        self.running: dict[tuple[Channel, int], asyncio.Task] = {}
        self.generation = 0
        self._acks: dict[int, tuple[set[Channel], asyncio.Event]] = {}
        self._reload_lock = asyncio.Lock()
        self.codec = Codec(ToExecutor)
        self._drift_flush: asyncio.TimerHandle | None = None
        self.stopping = asyncio.Event()

    # --- the model table ---------------------------------------------------------------------

    def _table(self) -> Table:
        return Table(epoch=self.epoch, generation=self.generation, device=self.device,
                     loaded=self.repository.loaded_once.is_set(), models=self.repository.table())

    async def _push_table(self) -> None:
        """Send the table to every front-end and wait (bounded) until each acknowledged it."""
        self.generation += 1
        peers = set(self.peers)
        if not peers:
            return
        waiting, done = set(peers), asyncio.Event()
        self._acks[self.generation] = (waiting, done)
        for p in peers:
            p.post(self._table())
        try:
            async with asyncio.timeout(ACK_TIMEOUT_S):
                await done.wait()
        except TimeoutError:  # busy, or about to disconnect (a dead front-end's connection closes by itself)
            log.warning("%d front-end(s) did not acknowledge the model table within %.0f s", len(waiting), ACK_TIMEOUT_S)
        finally:
            self._acks.pop(self.generation, None)

    async def reload(self) -> dict[str, str]:
        async with self._reload_lock:
            changes = await self.repository.reload()
            await self._push_table()
            self._write_drift_table()  # a new version's streams start afresh
            return changes

    # --- requests ----------------------------------------------------------------------------

    def _arena(self, path: str, peer: Channel) -> Arena:
        known = self.arenas.get(path)
        if known is None:
            if Path(path).parent != Path(self.spec.shm_dir):
                raise ServiceError(f"arena {path} is outside this server's shared-memory directory")
            known = self.arenas[path] = (Arena.attach(path), peer)
        return known[0]

    async def _answer(self, peer: Channel, h: Run | BuildPattern | DriftAction, work: Callable[[], Awaitable[Answer]],
                      what: str) -> None:
        """Run one request's ``work`` (which returns its reply) and post the reply: :class:`Cancelled`, or
        :class:`Failed` with the status a :class:`ServiceError` carries, 500 for anything else, 503 for a device
        fault, after which the process exits for the supervisor to restart it."""
        rid = h.id
        try:
            reply = await work()
        except asyncio.CancelledError:
            reply = Cancelled(id=rid)
        except ServiceError as e:
            reply = Failed(id=rid, status=e.status, reason=e.reason, message=e.message, headers=e.headers)
        except Exception as e:  # noqa: BLE001 - reported to the front-end, which answers 500 with a request id
            fault = is_device_fault(e)
            log.exception("%s on %s/%s failed%s", what, h.model, h.version,
                          "; the device is unusable, exiting for a restart" if fault else "")
            reply = Failed(id=rid, status=503 if fault else 500, reason="device_fault" if fault else "internal",
                           message=f"{type(e).__name__}: {e}".splitlines()[0], headers={"Retry-After": "5"} if fault else {})
            if fault:
                asyncio.get_running_loop().call_later(0.05, os._exit, EXIT_DEVICE_FAULT)
        finally:
            self.running.pop((peer, rid), None)
        if not peer.closed:
            peer.post(reply)

    async def _run(self, peer: Channel, h: Run) -> Done:
        """A task on tensors in the front-end's arena; the result goes back into the arena."""
        arena = self._arena(h.shm, peer)
        payload = {k: arena.view(ref, h.at).copy() for k, ref in h.inputs.items()}  # the region may be reused once we answer
        entry = self.repository.get_version(h.model, h.version)
        entry.check_ready()
        arena.view(h.output, h.at)[...] = await entry.batcher(h.task).submit(payload, h.timeout_s)
        return Done(id=h.id)

    async def _pattern(self, h: BuildPattern) -> PatternBuilt:
        """A missingness pattern's calibration, built here once per (model version, pattern) for every front-end
        (concurrent askers share the build), sent back as its dict."""
        entry = self.repository.get_version(h.model, h.version)
        pcal = self.core.pattern_calibrations(entry)
        if pcal is None:
            raise BadRequest(f"model {h.model!r} has no calibration for records with absent features")
        scorer = await self.core.pattern_scorer(entry, pcal, h.pattern)
        return PatternBuilt(id=h.id, calibration=scorer.calibration.model_dump(exclude_none=True))

    async def _drift(self, h: DriftAction) -> DriftReadings:
        """A drift action (``update``, ``readings``, ``reset``) on a model version's monitor, which lives here for every
        front-end (:mod:`service.core.drift`); the table the front-ends' ``/metrics`` read is rewritten soon after."""
        if h.action != "readings" and self._drift_flush is None:
            self._drift_flush = asyncio.get_running_loop().call_later(TABLE_EVERY_S, self._write_drift_table)
        entry = self.repository.get_version(h.model, h.version)
        p = None if h.p is None else np.asarray(h.p, dtype=np.float64)
        n = None if h.n is None else np.asarray(h.n, dtype=np.int64)
        units = None if h.units is None else np.asarray(h.units, dtype=np.int64)
        return DriftReadings(id=h.id, readings=self.core.drift_here(entry, h.action, h.stream, p, n, units))

    def _write_drift_table(self) -> None:
        self._drift_flush = None
        try:
            write_table(table_path(self.spec.shm_dir, self.spec.index), self.core.drift_rows())
        except OSError as e:  # the run directory is going away with the server
            log.warning("could not write the drift table: %s", e)

    async def _reload_for(self, peer: Channel, rid: int) -> None:
        try:
            reply: Reloaded | Failed = Reloaded(id=rid, changes=await self.reload())
        except Exception as e:  # noqa: BLE001
            log.exception("reload failed")
            reply = Failed(id=rid, status=500, reason="internal", message=f"reload failed: {e}")
        if not peer.closed:
            peer.post(reply)

    def _dispatch(self, peer: Channel, h: ToExecutor) -> None:
        match h:
            case Run():
                self.running[(peer, h.id)] = asyncio.create_task(self._answer(peer, h, lambda: self._run(peer, h), f"task {h.task}"))
            case Cancel():
                task = self.running.get((peer, h.id))
                if task is not None:
                    task.cancel()
            case Hello():
                peer.post(self._table())
            case TableAck():
                waiting = self._acks.get(h.generation)
                if waiting is not None:
                    waiting[0].discard(peer)
                    if not waiting[0]:
                        waiting[1].set()
            case Reload():
                asyncio.create_task(self._reload_for(peer, h.id))
            case BuildPattern():
                self.running[(peer, h.id)] = asyncio.create_task(self._answer(peer, h, lambda: self._pattern(h), "pattern calibration"))
            case DriftAction():
                self.running[(peer, h.id)] = asyncio.create_task(self._answer(peer, h, lambda: self._drift(h), "drift"))

    # --- the process -------------------------------------------------------------------------

    async def _publish_memory(self) -> None:
        while True:
            mem = self.worker.memory_allocated()
            if mem is not None:
                self.metrics.device_memory.labels(self.device).set(mem)
            await asyncio.sleep(2.0)

    async def _serve_peer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One front-end's connection, until it closes; then its unfinished work is cancelled."""
        peer = Channel(reader, writer, self.codec)
        self.peers.add(peer)
        try:
            while True:
                for h in await peer.receive():
                    self._dispatch(peer, h)
        except ConnectionError:
            pass
        except Exception:  # noqa: BLE001 - a malformed frame ends that connection, never the executor
            log.exception("closing a front-end connection after a message it could not handle")
        finally:
            self.peers.discard(peer)
            for (p, _), task in list(self.running.items()):
                if p is peer:
                    task.cancel()
            for path, (arena, owner) in list(self.arenas.items()):  # its arena goes with it
                if owner is peer:
                    del self.arenas[path]
                    arena.close()
            peer.close()

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        loop.add_signal_handler(signal.SIGINT, lambda: None)  # the supervisor decides when executors stop
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))
        address = self.spec.executor_address(self.spec.index)
        Path(address).unlink(missing_ok=True)
        server = await asyncio.start_unix_server(self._serve_peer, address)
        log.info("executor %d on %s listening at %s", self.spec.index, self.device, address)
        background = [asyncio.create_task(self.reload()), asyncio.create_task(self._publish_memory()),
                      asyncio.create_task(trim_malloc_every(self.settings.malloc_trim_s))]
        await self.stopping.wait()
        # SIGTERM: the front-ends have drained; finish what is still running, then go.
        deadline = time.monotonic() + self.settings.drain_timeout_s
        while self.running and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for t in background:
            t.cancel()
        server.close()
        for peer in list(self.peers):
            peer.close()
        await self.repository.close()
        self.worker.shutdown()
        log.info("executor %d stopped", self.spec.index)


def _cores() -> int:
    from service.ipc.children import available_cores

    return available_cores()


def main() -> None:
    spec = read_child_spec()
    die_with_parent(spec.parent)
    child_logging("executor", spec.index)
    apply_heap_settings(spec.settings)
    try:
        from uvloop import run
    except ImportError:  # pragma: no cover - uvicorn[standard] brings uvloop
        from asyncio import run
    run(Executor(spec).serve())

