"""Model artifacts: a directory, never a pickle.

``manifest.json`` holds the format version, the architecture config, the data spec, metrics,
calibration, the flowserve version, creation time and the sha256 of every other file;
``weights.safetensors`` holds the tensors. Loading verifies every checksum first.
"""

from __future__ import annotations

import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..density import DensityModel
from ..errors import ArtifactError
from .manifest import (
    FORMAT_VERSION,
    MANIFEST,
    WEIGHTS,
    Calibration,
    Manifest,
    flowserve_version,
    read_manifest,
    sha256,
    verify,
    write_manifest,
)

__all__ = ["FORMAT_VERSION", "MANIFEST", "WEIGHTS", "Manifest", "flowserve_version", "load", "read_manifest", "save", "sha256",
           "verify", "write_manifest"]


def save(
    model: DensityModel,
    architecture: dict[str, Any],
    directory: str | Path,
    metrics: dict[str, Any] | None = None,
    calibration: Calibration | None = None,
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


def load(directory: str | Path, device: str = "cpu") -> DensityModel:
    """Load an artifact as a ``DensityModel`` in eval mode, after verifying its checksums."""
    from ..architectures import build, parse_config

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
