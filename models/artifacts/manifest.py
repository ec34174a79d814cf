"""The manifest of a model artifact (``manifest.json``): reading, writing and checksum verification.

No torch here: the service's HTTP front-ends read manifests (data spec, calibration) without
loading any weights. :mod:`models.artifacts.store` adds saving and loading the weights.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from ..errors import ArtifactError
from ..spec import DataSpec

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"


def flowserve_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("flowserve")
    except PackageNotFoundError:  # pragma: no cover - source checkout without install
        return "0+unknown"


class TensorInfo(BaseModel):
    """One input or output of an exported graph (KServe V2 names: ``datatype`` ``FP32``; ``-1`` in ``shape`` is the batch)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    datatype: str
    shape: list[int]
    unit: str | None = None  # of an output: "nats"
    distribution: str | None = None  # of a noise input: the dequantization noise the graph expects


class Graph(BaseModel):
    """An exported ONNX graph of the artifact (``score.onnx`` or ``sample.onnx``)."""

    model_config = ConfigDict(extra="forbid")

    file: str
    opset: int
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]


class Graphs(BaseModel):
    """The artifact's exported graphs (:mod:`models.artifacts.export`), their parity with PyTorch, and the backend the
    service picks under ``FLOWSERVE_BACKEND=auto``."""

    model_config = ConfigDict(extra="forbid")

    score: Graph | None = None
    sample: Graph | None = None
    parity: dict[str, float] = {}  # log_prob_rel_err, sample_err
    preferred_backend: Literal["torch", "onnxruntime"] = "torch"

    def of(self, task: str) -> Graph | None:
        """The graph of ``task`` (``score`` or ``sample``), if exported."""
        return {"score": self.score, "sample": self.sample}.get(task)


class Calibration(BaseModel):
    """An anomaly calibration (:mod:`models.anomaly.calibration`): the NLLs of held-out normal records, against which a
    record's conformal p-value ``(1 + #{c_i ≥ s})/(n + 1)`` is computed, and what scoring records with absent features,
    the conditional statistic and attribution need. A missingness pattern's calibration has the same type, with
    ``pattern`` and ``samples`` set (``models.anomaly.scoring.pattern_calibration``)."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["conformal"] = "conformal"
    score: str = "nll_nats"  # what the scores are: "nll_nats", or "marginal_nll_nats" (a pattern's)
    statistic: str = "nll"  # the default statistic: nll, typicality or conditional
    split: str = "val"  # where the records came from
    n: int  # calibration records
    scores: list[float]  # their NLLs (nats), sorted; evenly spaced order statistics when there were many
    mean: float | None = None  # mean NLL (nats), the centre of the typicality statistic
    units: int | None = None  # independent units (patients) behind the records
    p_value_resolution: float | None = None  # 1/(n + 1)
    # record models
    fill: list[float] | None = None  # per-feature medians, for absent features (missing="median")
    reference: list[list[float]] | None = None  # (D, M) typical values per feature, for attribution
    group_reference: dict[str, list[list[float]]] | None = None  # per feature group: typical joint values
    atoms: list[tuple[int, float]] | None = None  # (feature, value) point masses of the conditional statistic
    atom_effects: list[float] | None = None  # their least-squares effects on the NLL (nats)
    conditional_scores: list[float] | None = None  # NLL minus the atoms' effects, sorted
    # records with absent features (models.anomaly.missing)
    proposal: dict[str, Any] | None = None  # the importance-sampling proposal (models.anomaly.marginal.Proposal)
    records: list[list[float]] | None = None  # calibration records a new pattern is calibrated on
    known: list[list[int]] | None = None  # which of their cells were measured (1) or filled (0)
    patterns: list[Calibration] | None = None  # stored calibrations of the most frequent patterns
    pattern: list[int] | None = None  # a pattern calibration's observed features
    samples: int | None = None  # importance samples K a pattern calibration was built with

    @model_validator(mode="before")
    @classmethod
    def _n_from_scores(cls, data: Any) -> Any:  # noqa: ANN401
        if isinstance(data, dict) and "n" not in data and "scores" in data:
            data = {**data, "n": len(data["scores"])}
        return data


class Manifest(BaseModel):
    """The contents of ``manifest.json``."""

    model_config = ConfigDict(extra="forbid")

    format_version: int
    flowserve_version: str
    created: str
    architecture: dict[str, Any]
    data_spec: DataSpec
    metrics: dict[str, Any] = {}
    calibration: Calibration | None = None
    files: dict[str, str]
    graphs: Graphs = Graphs()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_NUMBER = r"-?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|Infinity|NaN)"
_FLAT_NUMBERS = re.compile(rf"\[\s*{_NUMBER}(?:\s*,\s*{_NUMBER})*\s*\]")  # a list of numbers, no nesting


def write_manifest(directory: Path, manifest: Manifest) -> None:
    """``manifest.json``, indented, with each flat list of numbers (shapes, calibration scores) on one line."""
    data = manifest.model_dump(mode="json")
    data["graphs"] = manifest.graphs.model_dump(mode="json", exclude_defaults=True)  # only the graphs exported
    if manifest.calibration is not None:  # only what this kind of model's calibration has
        data["calibration"] = manifest.calibration.model_dump(mode="json", exclude_none=True)
    text = json.dumps(data, indent=2)
    text = _FLAT_NUMBERS.sub(lambda m: "[" + ", ".join(v.strip() for v in m.group(0)[1:-1].split(",")) + "]", text)
    (directory / MANIFEST).write_text(text + "\n")


def read_manifest(directory: str | Path) -> Manifest:
    """Parse and validate ``manifest.json`` (no checksum verification)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{path}: manifest not found (is {directory} a flowserve artifact?)")
    try:
        manifest = Manifest.model_validate_json(path.read_text())
    except ValidationError as e:
        first = e.errors()[0]
        raise ArtifactError(f"{path}: invalid manifest: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    if manifest.format_version > FORMAT_VERSION:
        raise ArtifactError(f"{path}: format version {manifest.format_version} is newer than this flowserve ({FORMAT_VERSION})")
    return manifest


def verify(directory: str | Path, manifest: Manifest) -> None:
    """Check that every file listed in the manifest exists and matches its sha256."""
    directory = Path(directory)
    for name, digest in manifest.files.items():
        path = directory / name
        if not path.is_file():
            raise ArtifactError(f"{path}: file listed in the manifest is missing")
        if sha256(path) != digest:
            raise ArtifactError(f"{path}: checksum mismatch (file changed or corrupted since export)")
