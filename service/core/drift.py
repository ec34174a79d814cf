"""Drift alarms per model version and stream: the state the anomaly route feeds
(:mod:`models.anomaly.drift` holds the detector and its guarantee).

Each served model version owns one :class:`DriftMonitor` (in ``ModelEntry.extras``), so a reload
starts every stream afresh. A monitor keeps at most ``FLOWSERVE_DRIFT_STREAMS`` streams; the least
recently fed one goes when a new one arrives.

**One state per stream, whatever the number of front-ends.** The monitors live in the process that
computes for the model: the single-process server, or the model's executor. Front-ends never hold
drift state; they send each request's p-values to that executor (``drift`` control message,
:meth:`service.frontend.RemoteRepository.drift`), which applies them in the order they arrive and
answers with the stream's reading. Rows of one stream sent through different front-ends therefore
meet in one detector. When a model is served by several executors, every front-end sends to the
same one (the lowest-numbered live executor serving it); an executor that restarts starts its
streams afresh, as a reload does.

Prometheus sees the live streams only: the gauges are built at scrape time from the monitors'
readings (:func:`exposition`), so an evicted stream's series disappears with it and the ``stream``
label never has more than ``FLOWSERVE_DRIFT_STREAMS`` values per model version. An executor keeps
its readings in a small table in the server's run directory, rewritten at most every
:data:`TABLE_EVERY_S` after a change (:func:`write_table`); a front-end's ``/metrics`` reads the
tables, so a scrape never waits on an executor that is computing.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import asdict
from pathlib import Path

import numpy as np
import orjson
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily

from models.anomaly.drift import DriftConfig, DriftDetector, DriftFamily, DriftReading
from service.errors import NotFound

log = logging.getLogger("flowserve.drift")

DEFAULT_STREAM = "default"
STREAM_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,63}$"  # also a safe Prometheus label value


class DriftMonitor:
    """The drift detectors of one model version's streams, at most ``streams`` of them (least recently fed out)."""

    def __init__(self, config: DriftConfig, streams: int) -> None:
        self.family = DriftFamily(config)
        self.limit = streams
        self.detectors: OrderedDict[str, DriftDetector] = OrderedDict()

    def update(self, stream: str, p: np.ndarray, n: np.ndarray, units: np.ndarray) -> tuple[DriftReading, bool]:
        """Feed one request's p-values ``p (N,)`` (against ``n (N,)`` calibration scores from ``units (N,)`` patients
        each), in request order; the stream's reading and whether this update raised its alarm."""
        det = self.detectors.get(stream)
        if det is None:
            if len(self.detectors) >= self.limit:
                gone, _ = self.detectors.popitem(last=False)
                log.info("drift stream %r evicted (at most %d streams per model version)", gone, self.limit)
            det = self.detectors[stream] = DriftDetector(self.family)
        else:
            self.detectors.move_to_end(stream)
        was = det.state.alarm_at is not None
        reading = det.update(p, n, units)
        return reading, reading.alarm and not was

    def readings(self, stream: str | None = None) -> dict[str, DriftReading]:
        """Every stream's reading, or one stream's (404 when it is not tracked)."""
        if stream is None:
            return {s: d.reading() for s, d in self.detectors.items()}
        det = self.detectors.get(stream)
        if det is None:
            raise NotFound(f"no drift stream {stream!r} is tracked for this model version "
                           f"({len(self.detectors)} streams: {', '.join(list(self.detectors)[:10]) or 'none'})")
        return {stream: det.reading()}

    def reset(self, stream: str | None = None) -> list[str]:
        """Forget one stream (404 when it is not tracked) or every stream; the streams reset."""
        if stream is None:
            gone = list(self.detectors)
            self.detectors.clear()
            return gone
        self.readings(stream)
        del self.detectors[stream]
        return [stream]


def reading_dict(stream: str, reading: DriftReading) -> dict:
    """A reading as the API and the control channel carry it."""
    return {"stream": stream, **asdict(reading)}


TABLE_EVERY_S = 0.25  # an executor rewrites its table of streams at most this often


def table_path(run_dir: str | Path, executor: int) -> Path:
    """Where executor ``executor`` keeps its table of drift readings for the front-ends' ``/metrics``."""
    return Path(run_dir) / f"drift-{executor}.json"


def write_table(path: Path, rows: list[tuple[str, str, dict]]) -> None:
    """Replace the table at ``path`` atomically (a front-end never reads half of one)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(orjson.dumps(rows))
    tmp.replace(path)


def read_table(path: Path) -> list[tuple[str, str, dict]]:
    """The rows of a table (none before the executor wrote one)."""
    try:
        return [tuple(r) for r in orjson.loads(path.read_bytes())]  # type: ignore[misc]
    except (OSError, orjson.JSONDecodeError):
        return []


def exposition(rows: list[tuple[str, str, dict]]) -> bytes:
    """Prometheus text for ``(model, version, reading dict)`` rows: the live streams' gauges."""
    stat = GaugeMetricFamily("flowserve_drift_statistic", "log of the drift detector's Shiryaev-Roberts statistic (nats)",
                             labels=["model", "version", "stream"])
    thr = GaugeMetricFamily("flowserve_drift_threshold", "log of the alarm threshold, log ERT (nats)", labels=["model", "version"])
    alarm = GaugeMetricFamily("flowserve_drift_alarm", "1 while a stream's drift alarm is raised (until reset)",
                              labels=["model", "version", "stream"])
    records = GaugeMetricFamily("flowserve_drift_records", "records a stream's detector has seen since its last reset",
                                labels=["model", "version", "stream"])
    seen = set()
    for model, version, r in rows:
        labels = [model, version, r["stream"]]
        stat.add_metric(labels, r["statistic"] if np.isfinite(r["statistic"]) else float("-inf"))
        alarm.add_metric(labels, 1.0 if r["alarm"] else 0.0)
        records.add_metric(labels, float(r["records"]))
        if (model, version) not in seen:
            seen.add((model, version))
            thr.add_metric([model, version], r["threshold"])
    registry = CollectorRegistry()
    registry.register(_Families([stat, thr, alarm, records]))
    return generate_latest(registry)


class _Families:
    def __init__(self, families: list) -> None:
        self.families = families

    def collect(self):  # noqa: ANN201 - Iterable[Metric]
        return iter(self.families)
