"""The manifest of a model artifact (``manifest.json``): reading, writing and checksum verification.

No torch here: the service's HTTP front-ends read manifests (data spec, calibration) without
loading any weights. :mod:`models.artifacts.store` adds saving and loading the weights.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

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


class Manifest(BaseModel):
    """The contents of ``manifest.json``."""

    model_config = ConfigDict(extra="forbid")

    format_version: int
    flowserve_version: str
    created: str
    architecture: dict[str, Any]
    data_spec: DataSpec
    metrics: dict[str, Any] = {}
    calibration: dict[str, Any] | None = None
    files: dict[str, str]
    graphs: dict[str, Any] = {}


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
    text = json.dumps(manifest.model_dump(mode="json"), indent=2)
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
