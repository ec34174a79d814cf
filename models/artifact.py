"""Model artifacts: a directory, never a pickle.

``manifest.json`` holds the format version, the architecture config, the data spec, metrics,
calibration, the flowserve version, creation time and the sha256 of every other file;
``weights.safetensors`` holds the tensors. Loading verifies every checksum first.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .density import DensityModel
from .errors import ArtifactError
from .spec import DataSpec

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


def save(
    model: DensityModel,
    architecture: dict[str, Any],
    directory: str | Path,
    metrics: dict[str, Any] | None = None,
    calibration: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` as an artifact directory (replacing one that exists) and return its path."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / WEIGHTS))
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        flowserve_version=flowserve_version(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        architecture=architecture,
        data_spec=model.spec,
        metrics=metrics or {},
        calibration=calibration,
        files={WEIGHTS: sha256(tmp / WEIGHTS)},
    )
    write_manifest(tmp, manifest)
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)
    return directory


def write_manifest(directory: Path, manifest: Manifest) -> None:
    (directory / MANIFEST).write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")


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


def load(directory: str | Path, device: str = "cpu") -> DensityModel:
    """Load an artifact as a ``DensityModel`` in eval mode, after verifying its checksums."""
    from .architectures import build, parse_config

    directory = Path(directory)
    manifest = read_manifest(directory)
    verify(directory, manifest)
    try:
        cfg = parse_config(manifest.architecture)
    except ValidationError as e:
        raise ArtifactError(f"{directory / MANIFEST}: invalid architecture config: {e.errors()[0]['msg']}") from None
    model = build(cfg, manifest.data_spec)
    try:
        state = load_file(str(directory / WEIGHTS))
        model.load_state_dict(state, strict=True)
    except (SafetensorError, RuntimeError) as e:
        raise ArtifactError(f"{directory / WEIGHTS}: weights do not fit the architecture ({str(e).splitlines()[0]})") from None
    model.manifest = manifest
    return model.to(device).eval()
