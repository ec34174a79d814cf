"""The DensityModel contract and artifacts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from models.architectures import build, parse_config
from models.artifacts import store as artifact
from models.data import load_dataset
from models.density import DensityModel
from models.errors import ArtifactError
from models.flows import Flatten, Sequential, data_init
from models.spec import DataSpec


def test_uniform_model_scores_log2_levels() -> None:
    """The uniform density on [0, L)^D scores exactly log2 L bits/dim (the bits/dim convention)."""
    spec = DataSpec(kind="image", shape=(1, 8, 8), levels=17)

    class Uniform(torch.nn.Module):
        # the uniform density on [0, L)^D written as a 'flow' with logdet = -D log L - log N(z)
        def forward(self, v):  # noqa: ANN001, ANN202
            z = torch.zeros(v.shape[0], 64, dtype=v.dtype)
            from models.flows import standard_normal_log_prob

            return z, -64 * math.log(17) - standard_normal_log_prob(z)

    model = DensityModel(Uniform(), spec)  # type: ignore[arg-type]
    model.register_parameter("dummy", torch.nn.Parameter(torch.zeros(1)))
    x = torch.randint(0, 17, (5, 1, 8, 8))
    torch.testing.assert_close(model.bits_per_dim(x), torch.full((5,), math.log2(17)))


@pytest.fixture(scope="module")
def digits_glow() -> DensityModel:
    ds = load_dataset("digits")
    model = build(parse_config({"name": "glow", "levels": 2, "steps": 2, "hidden": 16}), ds.spec)
    model.train()
    with data_init(model), torch.no_grad():
        model.log_prob(torch.from_numpy(ds.split("train")[:128]))
    return model.eval()


def test_results_do_not_depend_on_the_batch(digits_glow: DensityModel) -> None:
    x = torch.from_numpy(load_dataset("digits").split("test")[:16])
    noise = digits_glow.noise(16, torch.Generator().manual_seed(3))
    together = digits_glow.log_prob(x, noise)
    alone = torch.cat([digits_glow.log_prob(x[i : i + 1], noise[i : i + 1]) for i in range(16)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0])
def test_samples_are_valid_levels(digits_glow: DensityModel, temperature: float) -> None:
    s = digits_glow.sample(32, temperature, torch.Generator().manual_seed(0))
    assert s.shape == (32, 1, 8, 8)
    assert torch.isfinite(s).all() and s.min() >= 0 and s.max() <= 16
    assert torch.equal(s, s.round())


def test_iw_bound_not_below_single_sample_bound(digits_glow: DensityModel) -> None:
    x = torch.from_numpy(load_dataset("digits").split("test")[:8])
    single = torch.stack([digits_glow.log_prob(x, generator=torch.Generator().manual_seed(s)) for s in range(64)]).mean(0)
    iw = digits_glow.log_prob_iw(x, 64, generator=torch.Generator().manual_seed(0))
    assert iw.mean() >= single.mean()


def test_artifact_roundtrip_and_tamper(digits_glow: DensityModel, tmp_path: Path) -> None:
    arch = {"name": "glow", "levels": 2, "steps": 2, "hidden": 16}
    path = artifact.save(digits_glow, arch, tmp_path / "a", metrics={"x": 1})
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format_version"] == artifact.FORMAT_VERSION and manifest["data_spec"]["levels"] == 17
    assert set(manifest["files"]) == {"weights.safetensors"}
    loaded = artifact.load(path)
    x = torch.from_numpy(load_dataset("digits").split("test")[:4])
    noise = digits_glow.noise(4, torch.Generator().manual_seed(0))
    torch.testing.assert_close(loaded.log_prob(x, noise), digits_glow.log_prob(x, noise))
    raw = bytearray((path / "weights.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (path / "weights.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        artifact.load(path)


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="manifest not found"):
        artifact.load(tmp_path)


def test_flatten_in_sequential_roundtrip() -> None:
    f = Sequential([Flatten((2, 3))])
    x = torch.randn(4, 2, 3)
    z, ld = f(x)
    assert z.shape == (4, 6) and torch.equal(f.inverse(z), x) and torch.all(ld == 0)
