"""Service configuration from ``FLOWSERVE_*`` environment variables (pydantic-settings)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from typing_extensions import Annotated

from models.anomaly.drift import Bet, DriftConfig
from models.anomaly.marginal import DEFAULT_SAMPLES
from models.anomaly.missing import COLD_PATTERN_RECORDS, MIN_PATTERN_RECORDS


def _csv(value: object) -> list[str]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return list(value)  # type: ignore[arg-type]


def _bet(text: str) -> Bet:
    """A drift bet from ``power:weight`` (weight 1 when omitted)."""
    power, _, weight = text.partition(":")
    try:
        return Bet(power=float(power), weight=float(weight or 1))
    except ValueError as e:
        raise ValueError(f"drift bet {text!r}: power:weight with power in (0, 1) and weight in (0, 1] ({e})") from None


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/flowserve``, else ``~/.cache/flowserve``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flowserve"


class Settings(BaseSettings):
    """Every knob of the service; each is also ``FLOWSERVE_<NAME>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="FLOWSERVE_", extra="ignore")

    repository: Path = Field(Path("model_repository"), description="root of <name>/<version>/ artifact directories")
    host: str = "127.0.0.1"
    port: int = 8000
    devices: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["auto"], description="'auto', 'cpu', or e.g. 'cuda:0,cuda:1'")
    http_workers: int | None = Field(None, ge=0, le=256, description="HTTP front-end processes in front of one model-executor "
                                     "process per device; 0 = one process for everything; default: the cores left after one per "
                                     "executor (service.server.default_http_workers)")
    cuda_graphs: bool = Field(True, description="torch models on CUDA replay CUDA graphs captured per batch size at warm-up")
    compile: bool = Field(False, description="torch models' scoring forward goes through torch.compile (compiled at load, one "
                          "graph per batch size; minutes per model on a small CPU)")
    trace_cpu: bool = Field(True, description="torch models on the CPU score through a TorchScript graph traced, frozen and "
                            "optimised at load (service.executor.traced): no Python between ops, oneDNN convolutions at every batch size")
    batch_invariant: bool = Field(True, description="every row's result is bit-for-bit independent of its batch-mates: backends "
                                  "whose kernels depend on the batch size compute in tiles of tile_rows rows (service.executor.runners)")
    tile_rows: int = Field(64, ge=1, le=65536, description="rows per tile for batch-invariant execution (a lone request is "
                           "padded to this)")
    shm_arena_mb: int = Field(64, ge=1, le=65536, description="shared memory per front-end for tensors on their way to and from "
                              "the executors (MiB, in /dev/shm)")
    frontend_start_wait_s: float = Field(5.0, ge=0, le=600, description="a starting front-end accepts connections once every "
                                         "executor has told it what it serves, or after this long (the others serve meanwhile)")
    listen_backlog: int = Field(4096, ge=1, le=65535, description="connections the kernel queues per HTTP front-end before "
                                "it accepts them (capped by net.core.somaxconn); a burst of new connections beyond it stalls "
                                "clients for about a minute of SYN-ACK retries, so it should exceed the clients' connection pool")
    access_log: bool = Field(False, description="uvicorn's access log line per request (Prometheus counts requests either way)")
    backend: Literal["auto", "torch", "onnxruntime"] = Field("auto", description="auto: the manifest's preferred backend, else torch")
    require_gpu: bool = Field(False, description="a model that would run on CPU is not ready")
    ort_threads: int | None = Field(None, ge=1, description="ONNX Runtime intra-op threads (default: as torch)")
    ort_cpu_arena: bool = Field(True, description="ONNX Runtime CPU memory arena")
    ort_cache_dir: Path | None = Field(default_factory=lambda: default_cache_dir() / "onnxruntime",
                                       description="optimised ONNX Runtime CPU graphs are kept here, so a restart skips graph "
                                       "optimisation (service.executor.ort_sessions); empty = off")
    # batching
    max_batch_size: int = Field(256, ge=1, description="rows per batch")
    max_queue_delay_ms: Annotated[float, Field(ge=0)] | Literal["auto"] = Field(
        "auto", description="how long a batch may wait to fill. auto: for a task whose calls cost mostly a fixed amount "
        "(16 rows take less than twice 1 row, measured at load), up to that fixed cost (at most 10 ms) after a batch of 16+ "
        "rows (under load; at light load nothing waits) and while the batch's rows cost less than it; otherwise no "
        "wait (service.executor.batching.auto_queue_wait). A number: always that long (0 = take what queued while the device was busy)")
    max_queue_rows: int = Field(8192, ge=1, description="rows waiting per model and task; beyond → 503")
    request_timeout_s: float = Field(30.0, gt=0, description="per request, queue + compute; beyond → 503")
    # limits
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    max_rows: int = Field(4096, ge=1, description="rows per score/anomaly request")
    max_samples: int = Field(1024, ge=1, description="samples per sample request")
    max_iw_samples: int = Field(256, ge=1)
    anomaly_samples: int = Field(DEFAULT_SAMPLES, ge=1, le=4096, description="importance samples K for records with absent "
                                 "features (models.anomaly.marginal); each such record costs K flow rows; patterns stored in an "
                                 "artifact are used only when they were built with the same K")
    anomaly_pattern_cache: int = Field(1024, ge=1, description="missingness patterns whose calibration is kept (LRU)")
    anomaly_pattern_records: int = Field(COLD_PATTERN_RECORDS, ge=MIN_PATTERN_RECORDS, description="calibration records "
                                         "behind a missingness pattern built on first use (p-value resolution 1/(n + 1))")
    drift: bool = Field(True, description="drift alarms on the anomaly route: each request's p-values feed its stream's "
                        "sequential detector (models.anomaly.drift); false = no tracking and no drift in responses")
    drift_ert: float = Field(10_000.0, ge=2, description="expected records between false alarms on a stream without drift (the "
                             "Shiryaev-Roberts threshold A)")
    drift_confidence: float = Field(0.95, ge=0.5, lt=1, description="probability, over the draw of the calibration set, that the "
                                    "ERT guarantee holds for the calibration set in use")
    drift_bets: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["0.8:1", "0.5:0.3", "0.1:0.05"], description="the "
                                                       "alternatives the detector bets on, each power:weight (κ in (0, 1): "
                                                       "smaller bets harder on extreme p-values; w: share of records touched)")
    drift_sides: Annotated[list[Literal["unusual", "typical", "central"]], NoDecode] = Field(
        default_factory=lambda: ["unusual", "typical"], description="directions watched: unusual (NLL up), typical "
        "(NLL down: a stuck or flat-lined channel), central (scores bunched in the middle: less spread than calibration's)")
    drift_streams: int = Field(64, ge=1, le=4096, description="streams tracked per model version (least recently fed out)")
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, description="Bearer keys; empty = no auth")
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list, description="empty = CORS off")
    drain_timeout_s: float = Field(20.0, ge=0, description="how long SIGTERM waits for in-flight work")
    torch_threads: int | None = Field(None, ge=1, description="intra-op threads for CPU workers")
    malloc_trim_s: float = Field(10.0, ge=0, description="hand freed heap memory back to the OS this often (glibc malloc_trim); 0 = never")
    malloc_arenas: int = Field(2, ge=0, description="glibc malloc arenas (M_ARENA_MAX) for the server process; 0 = glibc's "
                               "default (8 per core)")
    gc_threshold: int = Field(20000, ge=0, description="net allocations of container objects between collections of the "
                              "youngest generation (gc.set_threshold); 0 = CPython's default (700)")

    @field_validator("ort_cache_dir", mode="before")
    @classmethod
    def _empty_is_off(cls, value: object) -> object:
        return None if isinstance(value, str) and value.strip() == "" else value

    def drift_config(self) -> DriftConfig:
        """The drift detector's parameters (:class:`models.anomaly.drift.DriftConfig`)."""
        return DriftConfig(ert=self.drift_ert, confidence=self.drift_confidence, bets=[_bet(b) for b in self.drift_bets],
                           sides=self.drift_sides)

    @field_validator("drift_bets")
    @classmethod
    def _bets(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one drift bet")
        for b in value:
            _bet(b)
        return value

    @field_validator("devices", "api_keys", "cors_origins", "drift_bets", "drift_sides", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> list[str]:
        """Lists come from the environment as comma-separated strings."""
        return _csv(value)
