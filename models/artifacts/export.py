"""ONNX export: a scoring graph and a sampling graph added to an artifact, and Triton repositories.

* ``score.onnx``: ``x (B, *shape)`` float32 [+ ``noise (B, *shape)``, the dequantization noise, for
  discrete data] → ``log_prob (B,)`` float32 nats. Noise is an explicit input, so scoring stays
  seeded and deterministic.
* ``sample.onnx``: ``z (B, D)`` float32 standard normal and ``temperature ()`` float32 → ``x (B, *shape)``
  in data space (integer levels for discrete data).

Both have a dynamic batch axis. Invertible 1×1 convolutions are frozen first (``W``, ``W⁻¹``,
``log|det W|`` as constants). Before the manifest lists a graph, ONNX Runtime runs it against
PyTorch on random valid inputs.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..density import DensityModel
from ..errors import ArtifactError
from ..seeding import noise_distribution
from . import store as artifact
from .manifest import Graph, Graphs, TensorInfo

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
SCORE, SAMPLE = "score.onnx", "sample.onnx"


class _Score(nn.Module):
    def __init__(self, model: DensityModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, noise: Tensor | None = None) -> Tensor:
        return self.model.log_prob(x, noise)


class _Sample(nn.Module):
    def __init__(self, model: DensityModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, z: Tensor, temperature: Tensor) -> Tensor:
        return self.model.sample(z.shape[0], 1.0, z=z * temperature)


def frozen_copy(model: DensityModel) -> DensityModel:
    """An eval-mode copy with every freezable layer frozen (for export)."""
    m = copy.deepcopy(model).cpu().eval()
    for layer in m.modules():
        if hasattr(layer, "freeze"):
            layer.freeze()
    return m


def random_inputs(model: DensityModel, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random valid scoring inputs: ``x`` within the data domain, and ``noise`` for discrete data."""
    feeds = {"x": model.spec.random_examples(n, seed)}
    if model.spec.dequantized:
        feeds["noise"] = model.noise(n, torch.Generator().manual_seed(seed)).numpy()
    return feeds


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str], dynamic: dict, opset: int) -> None:
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy TorchScript exporter (no onnxscript needed)
        torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs, dynamic_axes=dynamic,
                          opset_version=opset, dynamo=False, do_constant_folding=True)


def parity(model: DensityModel, directory: Path, n: int = 16, seed: int = 1) -> dict[str, float]:
    """Worst relative error of the ONNX graphs against PyTorch on fresh random valid inputs.

    ``log_prob``: max |Δ| / max(1, |log_prob|). Samples: for discrete data the fraction of values
    that differ (a float difference can move a value across a level boundary), for continuous data
    the max relative error.
    """
    import onnxruntime as ort

    score = ort.InferenceSession(str(directory / SCORE), providers=["CPUExecutionProvider"])
    sample = ort.InferenceSession(str(directory / SAMPLE), providers=["CPUExecutionProvider"])
    feeds = random_inputs(model, n, seed)
    want = model.log_prob(torch.from_numpy(feeds["x"]), None if "noise" not in feeds else torch.from_numpy(feeds["noise"])).detach().numpy()
    got = score.run(["log_prob"], feeds)[0]
    lp_err = float(np.max(np.abs(got - want) / np.maximum(1.0, np.abs(want))))
    z = np.random.default_rng(seed).standard_normal((n, model.spec.dims)).astype(np.float32)
    t = np.float32(0.8)
    want_x = model.sample(n, 1.0, z=torch.from_numpy(z * t)).numpy()
    got_x = sample.run(["x"], {"z": z, "temperature": np.array(t, dtype=np.float32)})[0]
    if model.spec.discrete:
        x_err = float(np.mean(got_x != want_x))
    else:
        x_err = float(np.max(np.abs(got_x - want_x) / np.maximum(1.0, np.abs(want_x))))
    return {"log_prob_rel_err": lp_err, "sample_err": x_err}


def export_artifact(directory: str | Path, opset: int = DEFAULT_OPSET, tolerance: float = 1e-4, prefer: bool = False) -> Graphs:
    """Add ``score.onnx`` and ``sample.onnx`` to the artifact at ``directory`` and list them in its manifest.

    ``prefer`` marks ONNX Runtime as the backend the service picks under ``FLOWSERVE_BACKEND=auto``.
    """
    directory = Path(directory)
    model = artifact.load(directory)
    manifest = model.manifest
    frozen = frozen_copy(model)
    spec = model.spec
    ex = random_inputs(frozen, 2)
    batch = {0: "batch"}
    if spec.dequantized:
        _export(_Score(frozen), (torch.from_numpy(ex["x"]), torch.from_numpy(ex["noise"])), directory / SCORE,
                ["x", "noise"], ["log_prob"], {"x": batch, "noise": batch, "log_prob": batch}, opset)
    else:
        _export(_Score(frozen), (torch.from_numpy(ex["x"]),), directory / SCORE, ["x"], ["log_prob"], {"x": batch, "log_prob": batch}, opset)
    _export(_Sample(frozen), (torch.zeros(2, spec.dims), torch.tensor(1.0)), directory / SAMPLE,
            ["z", "temperature"], ["x"], {"z": batch, "x": batch}, opset)
    errors = parity(model, directory)
    if errors["log_prob_rel_err"] > tolerance:
        raise ArtifactError(f"{directory}: ONNX scoring graph differs from PyTorch (relative error {errors['log_prob_rel_err']:.2e} > {tolerance:g})")
    shape = list(spec.shape)
    inputs = [TensorInfo(name="x", datatype="FP32", shape=[-1, *shape])]
    if spec.dequantized:
        inputs.append(TensorInfo(name="noise", datatype="FP32", shape=[-1, *shape], distribution=noise_distribution(manifest.architecture)))
    graphs = Graphs(
        score=Graph(file=SCORE, opset=opset, inputs=inputs, outputs=[TensorInfo(name="log_prob", datatype="FP32", shape=[-1], unit="nats")]),
        sample=Graph(file=SAMPLE, opset=opset,
                     inputs=[TensorInfo(name="z", datatype="FP32", shape=[-1, spec.dims]), TensorInfo(name="temperature", datatype="FP32", shape=[])],
                     outputs=[TensorInfo(name="x", datatype="FP32", shape=[-1, *shape])]),
        parity=errors,
        preferred_backend="onnxruntime" if prefer else "torch",
    )
    files = dict(manifest.files)
    for name in (SCORE, SAMPLE):
        files[name] = artifact.sha256(directory / name)
    artifact.write_manifest(directory, manifest.model_copy(update={"files": files, "graphs": graphs}))
    log.info("exported %s: parity %s", directory, errors)
    return graphs


def export_triton(directory: str | Path, out: str | Path, name: str | None = None, max_batch_size: int = 256) -> Path:
    """Write a Triton model repository ``out/<name>/1/model.onnx`` + ``config.pbtxt`` for the scoring graph."""
    directory, out = Path(directory), Path(out)
    manifest = artifact.read_manifest(directory)
    if manifest.graphs.score is None:
        raise ArtifactError(f"{directory}: no ONNX scoring graph; run `flowserve export {directory}` first")
    artifact.verify(directory, manifest)
    name = name or directory.parent.name if directory.parent.name not in ("", ".") else "model"
    dest = out / name / "1"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "model.onnx").write_bytes((directory / SCORE).read_bytes())
    dims = ", ".join(str(d) for d in manifest.data_spec.shape)
    inputs = "\n".join(
        f'  {{ name: "{i.name}" data_type: TYPE_FP32 dims: [ {dims} ] }},' for i in manifest.graphs.score.inputs
    ).rstrip(",")
    config = f'''name: "{name}"
backend: "onnxruntime"
max_batch_size: {max_batch_size}
input [
{inputs}
]
output [
  {{ name: "log_prob" data_type: TYPE_FP32 dims: [ 1 ] reshape: {{ shape: [ ] }} }}
]
dynamic_batching {{
  max_queue_delay_microseconds: 100
}}
instance_group [ {{ kind: KIND_AUTO count: 1 }} ]
'''
    (out / name / "config.pbtxt").write_text(config)
    return out / name
