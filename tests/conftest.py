"""Shared fixtures: tiny configs and trained artifacts built once per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from models.training.loop import TrainConfig, train

TINY_GLOW = {
    "data": "digits",
    "model": {"name": "glow", "levels": 2, "steps": 2, "hidden": 16},
    "train": {"steps": 40, "batch_size": 32, "eval_every": 20, "init_batch": 64, "ema": 0.9},
    "seed": 0,
}


@pytest.fixture(scope="session", autouse=True)
def ort_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Optimised ONNX graphs of this run go to a temporary directory, not the user's cache (servers inherit it)."""
    path = tmp_path_factory.mktemp("ort_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLOWSERVE_ORT_CACHE_DIR", str(path))
        yield path


@pytest.fixture(scope="session")
def tiny_glow_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Glow trained for a few steps on digits; returns the run directory."""
    out = tmp_path_factory.mktemp("glow_run")
    train(TrainConfig.model_validate(TINY_GLOW), out, progress=False)
    return out


@pytest.fixture(scope="session")
def repository(tiny_glow_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository with the tiny digits Glow as ``digits/1`` and a broken model."""
    import shutil

    root = tmp_path_factory.mktemp("repo")
    shutil.copytree(tiny_glow_run / "artifact", root / "digits" / "1")
    (root / "broken" / "1").mkdir(parents=True)
    (root / "broken" / "1" / "manifest.json").write_text("{not json")
    return root


@pytest.fixture(scope="module")
def server(repository: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    from tests.server import running_server

    # The default process layout, with two HTTP front-ends in front of the executor (as on a machine with 3+ cores).
    with running_server(repository, tmp_path_factory.mktemp("srv"), FLOWSERVE_MAX_QUEUE_DELAY_MS="5", FLOWSERVE_HTTP_WORKERS="2") as s:
        yield s
