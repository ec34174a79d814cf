"""Self-checks at load (service.executor.selfcheck) with injected faults: a graph that returns wrong numbers, one that
raises while it is built, a kernel that disagrees with its reference, ONNX Runtime that disagrees with torch,
and a device fault that restarts the executor. In each case the model serves on its reference path with the
reference's numbers, the counter counts, ``execution`` says why, and no request fails."""

from __future__ import annotations

import asyncio
import shutil
import textwrap
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from models.artifacts.store import load
from service.executor.repository import ModelRepository
from service.executor.runners import OnnxRunner, TorchRunner, check_onnx
from service.executor.selfcheck import DeviceFault, Fallback, Quarantine
from service.executor.workers import DeviceWorker
from service.metrics import Metrics
from service.settings import Settings

from .server import running_server

ROOT = Path(__file__).resolve().parent.parent
VITALS = ROOT / "model_repository" / "mimic-vitals" / "1"
WAVEFORM = ROOT / "model_repository" / "mimic-waveform" / "1"


def eager_log_prob(path: Path, x: np.ndarray) -> np.ndarray:
    """The reference: the artifact's model, eager, with the PyTorch butterfly levels."""
    from models.flows.butterfly import Butterfly

    model = load(path, "cpu")
    for m in model.modules():
        if isinstance(m, Butterfly):
            m.kernel = "torch"
    noise = None if model.dequantizer is None else torch.full(x.shape, 0.5)
    with torch.inference_mode():
        return model.log_prob(torch.from_numpy(x), noise).double().numpy()


def rows(path: Path, n: int = 9) -> np.ndarray:
    return load(path, "cpu").spec.random_examples(n, seed=123).astype(np.float32)


def records(n: int = 9) -> np.ndarray:
    """Valid vitals records (integer features integer), as a client sends them."""
    from models.data.cohort import generate_vitals
    from models.data.mimic import impute

    c = generate_vitals(20, 4, seed=3)
    return impute(c.values, c.patient).values[:n].astype(np.float32)


def wrong_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    """The traced graph returns its log-probabilities 0.5 nats off."""
    import service.executor.traced

    real = service.executor.traced.trace_score

    def trace_score(model, rows: int = 8):  # noqa: ANN001, ANN202
        graph = real(model, rows)
        return lambda *args: graph(*args) + 0.5

    monkeypatch.setattr(service.executor.traced, "trace_score", trace_score)


def failing_graph(monkeypatch: pytest.MonkeyPatch, message: str = "graph capture failed (injected)") -> None:
    import service.executor.traced

    def trace_score(model, rows: int = 8):  # noqa: ANN001, ANN202
        raise RuntimeError(message)

    monkeypatch.setattr(service.executor.traced, "trace_score", trace_score)


def disagreeing_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused butterfly runs here (as on CUDA) and its levels are 1% off the PyTorch levels."""
    from models.flows.butterfly import Butterfly

    def levels(self, h: torch.Tensor, inverse: bool) -> torch.Tensor:  # noqa: ANN001
        for f in (reversed(self.factors) if inverse else self.factors):
            h = f.inverse(h) if inverse else f(h)
        return h * 1.01

    monkeypatch.setattr(Butterfly, "_fused", lambda self, x: self.kernel != "torch")
    monkeypatch.setattr(Butterfly, "_kernel_levels", levels)


def serve_once(path: Path, x: np.ndarray, tmp_path: Path) -> tuple[np.ndarray, dict[str, str], float]:
    """Load ``path`` in a repository as the executor does, score ``x`` through its batcher; the scores, the entry's
    ``execution``, and ``flowserve_fallbacks_total`` for it."""
    repo = tmp_path / "repository"
    shutil.copytree(path, repo / "m" / "1")

    async def run() -> tuple[np.ndarray, dict[str, str], float]:
        metrics = Metrics()
        worker = DeviceWorker("cpu")
        repository = ModelRepository(Settings(repository=repo, max_queue_delay_ms=0), [worker], metrics)
        try:
            await repository.reload()
            entry = repository.get("m")
            assert entry.state == "ready", entry.reason
            payload = {"x": x, "noise": np.full(x.shape, 0.5, np.float32)} if entry.manifest.data_spec.dequantized else {"x": x}
            got = await entry.batcher("score").submit(payload, 30)
            counted = sum(s.value for fam in metrics.registry.collect() if fam.name == "flowserve_fallbacks"
                          for s in fam.samples if s.name.endswith("_total") and s.labels["model"] == "m")
            return got, dict(entry.execution), counted
        finally:
            await repository.close()
            worker.shutdown()

    return asyncio.run(run())


def test_a_graph_that_returns_wrong_numbers_is_switched_off(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    wrong_graph(monkeypatch)
    x = rows(VITALS)
    got, execution, counted = serve_once(VITALS, x, tmp_path)
    np.testing.assert_allclose(got, eager_log_prob(VITALS, x), rtol=1e-5, atol=1e-4)  # the reference's numbers
    assert execution["score"].startswith("eager") and "torchscript off: mismatch" in execution["score"]
    assert counted == 1


def test_a_graph_that_raises_while_it_is_built_is_switched_off(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    failing_graph(monkeypatch)
    x = rows(VITALS)
    got, execution, counted = serve_once(VITALS, x, tmp_path)
    np.testing.assert_allclose(got, eager_log_prob(VITALS, x), rtol=1e-5, atol=1e-4)
    assert "torchscript off: error, RuntimeError: graph capture failed (injected)" in execution["score"]
    assert counted == 1


def test_a_kernel_that_disagrees_with_its_reference_is_switched_off(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    disagreeing_kernel(monkeypatch)
    x = rows(WAVEFORM, 5)
    got, execution, counted = serve_once(WAVEFORM, x, tmp_path)
    np.testing.assert_allclose(got, eager_log_prob(WAVEFORM, x), rtol=1e-5, atol=1e-3)
    for task in ("score", "sample"):
        assert "triton butterfly off: mismatch" in execution[task]
    assert counted == 2


def test_onnx_runtime_that_disagrees_with_torch_is_found(monkeypatch: pytest.MonkeyPatch) -> None:
    digits = ROOT / "model_repository" / "digits" / "1"
    runner = OnnxRunner(digits, "cpu", Settings())
    assert check_onnx(runner, digits) is None  # the exported graph agrees with torch
    real = runner.log_prob
    monkeypatch.setattr(runner, "log_prob", lambda x, noise: real(x, noise) - 0.25)
    fallback = check_onnx(runner, digits)
    assert fallback is not None and (fallback.path, fallback.reason) == ("onnxruntime cuda", "mismatch")


def test_a_device_fault_is_remembered_and_the_reload_goes_without_the_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    quarantine = Quarantine(tmp_path / "quarantine.json")
    failing_graph(monkeypatch, "CUDA error: an illegal memory access was encountered (injected)")
    with pytest.raises(DeviceFault):
        TorchRunner(VITALS, "cpu", Settings(), quarantine)
    assert quarantine.of(VITALS) == [Fallback("score", "torchscript", "device_fault",
                                              "CUDA error: an illegal memory access was encountered (injected)")]
    monkeypatch.undo()  # the path would work now; the quarantine keeps it off until the server restarts
    runner = TorchRunner(VITALS, "cpu", Settings(), quarantine)
    assert runner.execution["score"].startswith("eager") and "torchscript off: device_fault" in runner.execution["score"]


SITE = '''
import importlib.abc, importlib.machinery, sys

class _Inject(importlib.abc.MetaPathFinder):
    """After service.executor.traced is imported, make its trace_score {what}."""

    def find_spec(self, name, path, target=None):
        if name != "service.executor.traced":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        loader = spec.loader
        exec_module = loader.exec_module

        def patched(module):
            exec_module(module)
            real = module.trace_score
{body}
            module.trace_score = trace_score

        loader.exec_module = patched
        return spec

sys.meta_path.insert(0, _Inject())
'''


def injected(tmp_path: Path, what: str, body: str) -> dict[str, str]:
    """Environment for a server whose processes load ``service.executor.traced`` with ``body`` as its ``trace_score``."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITE.format(what=what, body=textwrap.indent(textwrap.dedent(body), " " * 12)))
    import os

    return {"PYTHONPATH": os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")])}


def test_through_a_real_server_a_wrong_graph_never_answers_a_request(tmp_path: Path) -> None:
    env = injected(tmp_path, "return numbers 0.5 nats off", '''
        def trace_score(model, rows=8):
            graph = real(model, rows)
            return lambda *args: graph(*args) + 0.5
    ''')
    repo = tmp_path / "repository"
    shutil.copytree(VITALS, repo / "mimic-vitals" / "1")
    x = records()
    with running_server(repo, tmp_path, FLOWSERVE_HTTP_WORKERS="1", **env) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        r = c.post("/v1/models/mimic-vitals/anomaly", json={"records": x.tolist(), "explain": "none"})  # bin midpoints
        assert r.status_code == 200, r.text
        got = -np.array([v["nll"] for v in r.json()["results"]])
        execution = c.get("/v1/models/mimic-vitals").json()["execution"]
        metrics = c.get("/metrics").text
    np.testing.assert_allclose(got, eager_log_prob(VITALS, x), rtol=1e-5, atol=1e-4)
    assert "torchscript off: mismatch" in execution["score"]
    assert 'flowserve_fallbacks_total{model="mimic-vitals",reason="mismatch",task="score"} 1.0' in metrics


def test_through_a_real_server_a_device_fault_restarts_the_executor_without_the_path(tmp_path: Path) -> None:
    env = injected(tmp_path, "fault the device", '''
        def trace_score(model, rows=8):
            raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
    ''')
    repo = tmp_path / "repository"
    shutil.copytree(VITALS, repo / "mimic-vitals" / "1")
    x = records()
    with running_server(repo, tmp_path, FLOWSERVE_HTTP_WORKERS="1", **env) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        r = c.post("/v1/models/mimic-vitals/anomaly", json={"records": x.tolist(), "explain": "none"})
        assert r.status_code == 200, r.text
        execution = c.get("/v1/models/mimic-vitals").json()["execution"]
        metrics = c.get("/metrics").text
    np.testing.assert_allclose([-v["nll"] for v in r.json()["results"]], eager_log_prob(VITALS, x), rtol=1e-5, atol=1e-4)
    assert "torchscript off: device_fault" in execution["score"]
    assert 'flowserve_executor_restarts_total{device="cpu"} 1.0' in metrics
