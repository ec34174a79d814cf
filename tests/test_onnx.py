"""ONNX export: parity with PyTorch for every architecture, Triton config, the service on ONNX Runtime."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from models.architectures import build, parse_config
from models.artifacts import store as artifact
from models.artifacts.export import export_artifact, export_triton, parity
from models.data import load_dataset
from models.flows import data_init
from models.spec import DataSpec
from tests.server import running_server

RECORD_SPEC = DataSpec(kind="record", shape=(6,), feature_names=[f"f{i}" for i in range(6)], ranges=[(-3.0, 3.0)] * 6)
TABLE_SPEC = DataSpec(kind="record", shape=(5,), feature_names=[f"c{i}" for i in range(5)], ranges=[(-3.0, 3.0)] * 5,
                      discrete_features=[0])  # one integer-valued column: noise is an input of the graph
WAVE_SPEC = DataSpec(kind="waveform", shape=(2, 32), feature_names=["PLETH", "ABP"], ranges=[(-1.0, 1.0)] * 2)
ARCHS = {
    "glow": ({"name": "glow", "levels": 2, "steps": 2, "hidden": 16}, None),
    "glow_plain_conv": ({"name": "glow", "levels": 1, "steps": 2, "hidden": 16, "lu": False}, None),
    "realnvp": ({"name": "realnvp", "levels": 2, "hidden": 16}, None),
    "vector": ({"name": "vector", "steps": 3, "hidden": 16}, RECORD_SPEC),
    "tabular": ({"name": "tabular", "steps": 2, "hidden": 8}, TABLE_SPEC),
    "butterflyflow": ({"name": "butterflyflow", "levels": 2, "steps": 2, "hidden": 16, "init": "rotation", "layout": "channel_last"}, None),
    "waveform_butterfly": ({"name": "waveform", "levels": 2, "steps": 2, "hidden": 8, "butterfly_levels": [5, 4]}, WAVE_SPEC),
    "waveform_glow": ({"name": "waveform", "levels": 2, "steps": 2, "hidden": 8}, WAVE_SPEC),
    "flowpp": ({"name": "flowpp", "layout": ["columns:2", "squeeze", "channel:1"], "filters": 8, "blocks": 1, "components": 3, "heads": 2, "dropout": 0.0, "dequant_couplings": 1,
                "dequant_filters": 8, "dequant_blocks": 1, "context_channels": 4, "context_blocks": 1}, None),
}


def _artifact(tmp: Path, arch: str) -> Path:
    cfg, spec = ARCHS[arch]
    torch.manual_seed(0)
    if spec is None:
        data = load_dataset("digits")
        spec, x = data.spec, torch.from_numpy(data.split("train")[:128])
    else:
        x = torch.randn(128, *spec.shape) * 1.5
    model = build(parse_config(cfg), spec)
    model.train()
    with data_init(model), torch.no_grad():
        model.log_prob(x)
        for p in model.parameters():  # move away from the identity-like initialisation
            p.add_(0.05 * torch.randn_like(p))
    return artifact.save(model.eval(), cfg, tmp / arch / "1")


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_onnx_parity(arch: str, tmp_path: Path) -> None:
    path = _artifact(tmp_path, arch)
    graphs = export_artifact(path)
    model = artifact.load(path)  # checksums of the new graph files verify
    assert set(model.manifest.files) == {"weights.safetensors", "score.onnx", "sample.onnx"}
    fresh = parity(model, path, n=32, seed=123)  # new random inputs, not the export's
    assert fresh["log_prob_rel_err"] <= 1e-4, fresh
    if model.spec.discrete:
        assert fresh["sample_err"] <= 0.01, fresh  # fraction of values on the other side of a level boundary
    else:
        assert fresh["sample_err"] <= 1e-4, fresh
    assert graphs.score.inputs[0].shape[0] == -1


def test_triton_repository_config_parses(tmp_path: Path) -> None:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    path = _artifact(tmp_path, "glow")
    export_artifact(path)
    repo = export_triton(path, tmp_path / "triton", name="digits")
    cfg = text_format.Parse((repo / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert cfg.name == "digits" and cfg.backend == "onnxruntime" and cfg.max_batch_size == 256
    assert [i.name for i in cfg.input] == ["x", "noise"] and list(cfg.input[0].dims) == [1, 8, 8]
    assert cfg.output[0].name == "log_prob" and cfg.HasField("dynamic_batching")
    assert (repo / "1" / "model.onnx").read_bytes() == (path / "score.onnx").read_bytes()


def test_service_through_onnxruntime_backend(repository: Path, tmp_path: Path) -> None:
    import tritonclient.http as httpclient

    repo = tmp_path / "repo"
    shutil.copytree(repository / "digits", repo / "digits")
    export_artifact(repo / "digits" / "1")
    rows = load_dataset("digits").split("test")[:6]
    body = {"instances": rows.tolist(), "seed": 3}
    with running_server(repo, tmp_path) as s, s.client() as c:
        torch_lp = [r["log_prob"] for r in c.post("/v1/models/digits/score", json=body).json()["results"]]
    with running_server(repo, tmp_path, FLOWSERVE_BACKEND="onnxruntime") as s, s.client() as c:
        info = c.get("/v1/models/digits").json()
        assert info["backend"] == "onnxruntime" and info["execution"]["score"].startswith("session run, CPU provider"), info
        ort_lp = [r["log_prob"] for r in c.post("/v1/models/digits/score", json=body).json()["results"]]
        np.testing.assert_allclose(ort_lp, torch_lp, rtol=1e-4)
        samples = c.post("/v1/models/digits/sample", json={"n": 4, "seed": 1, "temperature": 0.8}).json()["samples"]
        assert np.array(samples).shape == (4, 1, 8, 8)
        client = httpclient.InferenceServerClient(url=f"127.0.0.1:{s.port}")
        inp = httpclient.InferInput("input", list(rows.shape), "UINT8")
        inp.set_data_from_numpy(rows.astype(np.uint8))
        res = client.infer("digits", [inp], parameters={"seed": 3})
        np.testing.assert_allclose(res.as_numpy("log_prob"), torch_lp, rtol=1e-4)
        client.close()


def test_require_gpu_makes_cpu_model_not_ready(repository: Path, tmp_path: Path) -> None:
    with running_server(repository, tmp_path, FLOWSERVE_REQUIRE_GPU="1") as s, s.client() as c:
        m = c.get("/v1/models/digits").json()
        assert m["state"] == "failed" and "REQUIRE_GPU" in m["reason"]
        assert c.post("/v1/models/digits/score", json={"instances": [[[0] * 8] * 8]}).status_code == 503


def test_export_of_missing_graphs_is_a_clear_error(tmp_path: Path) -> None:
    from models.errors import ArtifactError

    path = _artifact(tmp_path, "glow")
    with pytest.raises(ArtifactError, match="flowserve export"):
        export_triton(path, tmp_path / "t")


def test_optimised_graphs_are_cached_and_give_the_same_results(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The first session writes the optimised graph, the next loads it (unchanged results, entry untouched
    but for its time of use); an unreadable entry is rebuilt; an unwritable cache directory is only a warning."""
    from service.executor.ort_sessions import cache_entry, prune
    from service.executor.runners import OnnxRunner
    from service.settings import Settings

    version = Path(__file__).resolve().parent.parent / "model_repository" / "digits" / "1"
    manifest = artifact.read_manifest(version)
    entries = [cache_entry(tmp_path / "cache", manifest.files[manifest.graphs.of(t).file]) for t in ("score", "sample")]
    x = manifest.data_spec.random_examples(7, seed=2).astype(np.float32)
    noise = np.random.default_rng(0).random(x.shape, dtype=np.float32)
    z = np.random.default_rng(1).standard_normal((3, manifest.data_spec.dims)).astype(np.float32)

    def outputs(cache: Path | None) -> tuple[np.ndarray, np.ndarray]:
        runner = OnnxRunner(version, "cpu", Settings(ort_cache_dir=cache))
        return runner.log_prob(x, noise), runner.sample(z)

    fresh = outputs(None)
    with caplog.at_level("INFO", logger="service.executor.ort_sessions"):
        first = outputs(tmp_path / "cache")
    assert all(e.is_file() for e in entries) and caplog.text.count("cached as") == 2
    written = [e.read_bytes() for e in entries]
    caplog.clear()
    with caplog.at_level("INFO", logger="service.executor.ort_sessions"):
        again = outputs(tmp_path / "cache")
    assert "cached as" not in caplog.text and [e.read_bytes() for e in entries] == written
    for a, b, c in zip(fresh, first, again):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)

    entries[0].write_bytes(b"not an onnx graph")
    with caplog.at_level("INFO", logger="service.executor.ort_sessions"):
        rebuilt = outputs(tmp_path / "cache")
    assert "cannot be loaded" in caplog.text and caplog.text.count("cached as") == 1
    np.testing.assert_array_equal(rebuilt[0], fresh[0])
    np.testing.assert_array_equal(outputs(tmp_path / "cache")[0], fresh[0])  # the rebuilt entry loads

    (tmp_path / "file").write_text("")
    caplog.clear()
    np.testing.assert_array_equal(outputs(tmp_path / "file" / "cache")[0], fresh[0])
    assert "not cached" in caplog.text

    for e in entries:  # an entry that cannot be written (here: a directory in the way of its temporary file) is skipped
        e.unlink()
        e.with_name(f".{e.name}.{os.getpid()}.tmp").mkdir()
    caplog.clear()
    with caplog.at_level("INFO", logger="service.executor.ort_sessions"):
        np.testing.assert_array_equal(outputs(tmp_path / "cache")[0], fresh[0])
    assert caplog.text.count("cannot cache the optimised graph") == 2 and not any(e.exists() for e in entries)
    for e in entries:
        e.with_name(f".{e.name}.{os.getpid()}.tmp").rmdir()
    outputs(tmp_path / "cache")

    prune(tmp_path / "cache", keep=entries[1], limit=1)
    assert not entries[0].exists() and entries[1].exists()
