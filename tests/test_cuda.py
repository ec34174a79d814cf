"""CUDA paths: skipped cleanly where there is no CUDA device (the CI machine, a 2-core CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import TINY_GLOW

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


def test_training_runs_on_cuda_end_to_end(tmp_path: Path) -> None:
    """A few steps on the GPU, then evaluation and the sample grid on the GPU too; the artifact loads on the CPU."""
    from models import load
    from models.training.loop import TrainConfig, train

    cfg = TrainConfig.model_validate({**TINY_GLOW, "device": "cuda", "train": {**TINY_GLOW["train"], "steps": 10, "eval_every": 5}})
    m = train(cfg, tmp_path / "run", progress=False)
    assert m["steps"] == 10 and np.isfinite(m["test_bits_per_dim"])
    assert (tmp_path / "run" / "samples.png").is_file()
    assert load(str(tmp_path / "run" / "artifact")).device.type == "cpu"


def test_cpu_and_gpu_log_prob_agree() -> None:
    from models import load

    model = load("model_repository/digits-flowpp/1")
    x = torch.from_numpy(model.spec.random_examples(16, seed=3))
    noise = model.noise(16, seed=5)
    cpu = model.log_prob(x, noise).double()
    gpu = model.to("cuda").log_prob(x, noise).double().cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-4, atol=1e-3)


def test_flowpp_sampling_is_graph_capturable() -> None:
    """Off the CPU the mixture inverse runs a fixed iteration count with no host reads, so a CUDA graph captures it."""
    from models import load

    model = load("model_repository/digits-flowpp/1").to("cuda")
    z = torch.randn(64, model.spec.dims, device="cuda")
    with torch.no_grad():
        eager = model.flow.inverse(z)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            model.flow.inverse(z)  # warm-up on a side stream, as capture requires
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = model.flow.inverse(z)
        graph.replay()
    torch.testing.assert_close(captured, eager)


def _probe_equal_in_batches(runner, x: np.ndarray, noise: np.ndarray | None) -> None:  # noqa: ANN001
    """Rows 0..2 alone equal the same rows inside larger batches at other positions, bit for bit."""
    alone = runner.log_prob(x[:3], None if noise is None else noise[:3])
    for size, at in ((17, 5), (100, 90), (len(x), 40)):
        idx = np.r_[np.arange(3, 3 + at), np.arange(3), np.arange(3 + at, size)]
        got = runner.log_prob(x[idx], None if noise is None else noise[idx])[at : at + 3]
        np.testing.assert_array_equal(got, alone)


@pytest.mark.parametrize("graphs", [True, False], ids=["graphs", "eager"])
def test_runner_batched_equals_solo_with_graphs_on_and_off(graphs: bool) -> None:
    from service.core.tasks import dequantization_noise
    from service.executor.compute import check_batch_invariance
    from service.executor.runners import TorchRunner
    from service.settings import Settings

    settings = Settings(cuda_graphs=graphs, devices=["cuda:0"])
    runner = TorchRunner(Path("model_repository/digits/1"), "cuda:0", settings)
    check_batch_invariance(runner, settings)
    assert runner.execution["score"].startswith("cuda graphs" if graphs else "eager"), runner.execution
    x = runner.manifest.data_spec.random_examples(300, seed=1).astype(np.float32)
    noise = dequantization_noise(runner.manifest, 300, 2)
    _probe_equal_in_batches(runner, x, noise)


def test_graph_replay_equals_eager_bit_for_bit() -> None:
    from service.core.tasks import dequantization_noise
    from service.executor.runners import TorchRunner
    from service.settings import Settings

    graphed = TorchRunner(Path("model_repository/digits/1"), "cuda:0", Settings(cuda_graphs=True))
    eager = TorchRunner(Path("model_repository/digits/1"), "cuda:0", Settings(cuda_graphs=False))
    x = graphed.manifest.data_spec.random_examples(150, seed=4).astype(np.float32)
    noise = dequantization_noise(graphed.manifest, 150, 4)
    np.testing.assert_array_equal(graphed.log_prob(x, noise), eager.log_prob(x, noise))
    z = np.random.default_rng(0).standard_normal((70, graphed.manifest.data_spec.dims), dtype=np.float32)
    np.testing.assert_array_equal(graphed.sample(z), eager.sample(z))


def test_ladder_of_graphs_without_invariance() -> None:
    from service.executor.runners import TorchRunner
    from service.settings import Settings

    runner = TorchRunner(Path("model_repository/digits/1"), "cuda:0", Settings(cuda_graphs=True, batch_invariant=False,
                                                                                max_batch_size=64))
    assert runner.execution["score"] == "cuda graphs at 1,2,4,8,16,32,64 rows"
    x = runner.manifest.data_spec.random_examples(37, seed=4).astype(np.float32)
    assert np.isfinite(runner.log_prob(x, np.full_like(x, 0.5))).all()


def test_flowpp_sampling_is_captured_by_the_runner() -> None:
    from service.executor.runners import TorchRunner
    from service.settings import Settings

    runner = TorchRunner(Path("model_repository/digits-flowpp/1"), "cuda:0", Settings(cuda_graphs=True, tile_rows=16))
    assert runner.execution["sample"].startswith("cuda graphs"), runner.execution
    z = np.random.default_rng(0).standard_normal((20, runner.manifest.data_spec.dims), dtype=np.float32)
    assert np.isfinite(runner.sample(z)).all()


def test_onnxruntime_io_binding_matches_the_cpu() -> None:
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime without the CUDA provider")
    from service.core.tasks import dequantization_noise
    from service.executor.runners import OnnxRunner
    from service.settings import Settings

    gpu = OnnxRunner(Path("model_repository/digits/1"), "cuda:0", Settings())
    cpu = OnnxRunner(Path("model_repository/digits/1"), "cpu", Settings())
    assert gpu.execution["score"].startswith("io binding")
    x = gpu.manifest.data_spec.random_examples(90, seed=2).astype(np.float32)
    noise = dequantization_noise(gpu.manifest, 90, 2)
    np.testing.assert_allclose(gpu.log_prob(x, noise), cpu.log_prob(x, noise), rtol=1e-4, atol=1e-3)


def test_served_on_cuda_with_graphs(tmp_path: Path) -> None:
    import httpx

    from tests.server import running_server

    with running_server(Path("model_repository"), tmp_path, FLOWSERVE_DEVICES="cuda:0", FLOWSERVE_BACKEND="torch") as s:
        info = httpx.get(f"{s.url}/v1/models/digits").json()
        assert info["devices"] == ["cuda:0"] and info["execution"]["score"].startswith("cuda graphs"), info
        r = httpx.post(f"{s.url}/v1/models/digits/score", json={"instances": [[[0] * 8] * 8]})
        assert r.status_code == 200
