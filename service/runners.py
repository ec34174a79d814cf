"""Backends behind one interface: a model on one device that scores and samples numpy batches.

``log_prob(x, noise) -> (B,)`` nats; ``sample(z) -> (B, *shape)`` in data space.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from models.artifact import Manifest, load, read_manifest, verify
from models.density import DensityModel
from models.errors import ArtifactError

from .settings import Settings

log = logging.getLogger(__name__)


class Runner(Protocol):
    backend: str
    device: str
    manifest: Manifest

    def log_prob(self, x: np.ndarray, noise: np.ndarray | None) -> np.ndarray: ...

    def sample(self, z: np.ndarray) -> np.ndarray: ...


class TorchRunner:
    """A ``DensityModel`` on a torch device, in inference mode."""

    backend = "torch"

    def __init__(self, path: Path, device: str) -> None:
        self.device = device
        self.model: DensityModel = load(path, device)
        self.manifest = self.model.manifest

    def log_prob(self, x: np.ndarray, noise: np.ndarray | None) -> np.ndarray:
        with torch.inference_mode():
            xt = torch.from_numpy(x).to(self.device, torch.float32)
            nt = None if noise is None else torch.from_numpy(noise).to(self.device)
            return self.model.log_prob(xt, nt).double().cpu().numpy()

    def sample(self, z: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.model.sample(len(z), 1.0, z=torch.from_numpy(z)).cpu().numpy()


class OnnxRunner:
    """The artifact's ONNX graphs in ONNX Runtime sessions (CUDA provider on a GPU device).

    onnxruntime falls back to the CPU silently when CUDA cannot be used, so the providers a
    session really got are checked; with ``require_gpu`` a CPU fallback is an error.
    """

    backend = "onnxruntime"

    def __init__(self, path: Path, device: str, settings: Settings) -> None:
        import onnxruntime as ort

        self.manifest = read_manifest(path)
        verify(path, self.manifest)
        if "score" not in self.manifest.graphs or "sample" not in self.manifest.graphs:
            raise ArtifactError(f"{path}: no ONNX graphs; run `flowserve export {path}` or use FLOWSERVE_BACKEND=torch")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = settings.ort_threads or torch.get_num_threads()
        opts.enable_cpu_mem_arena = settings.ort_cpu_arena
        providers: list = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            index = int(device.partition(":")[2] or 0)
            providers = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
        self.sessions = {}
        for task in ("score", "sample"):
            sess = ort.InferenceSession(str(path / self.manifest.graphs[task]["file"]), opts, providers=providers)
            if device.startswith("cuda") and "CUDAExecutionProvider" not in sess.get_providers():
                if settings.require_gpu:
                    raise RuntimeError(f"ONNX Runtime cannot use CUDA for {device} (providers {sess.get_providers()}) and FLOWSERVE_REQUIRE_GPU=1")
                log.warning("ONNX Runtime fell back to %s for %s", sess.get_providers(), device)
            self.sessions[task] = sess
        self.device = device if "CUDAExecutionProvider" in self.sessions["score"].get_providers() else "cpu"

    def log_prob(self, x: np.ndarray, noise: np.ndarray | None) -> np.ndarray:
        feeds = {"x": x.astype(np.float32, copy=False)}
        if noise is not None:
            feeds["noise"] = noise.astype(np.float32, copy=False)
        return self.sessions["score"].run(["log_prob"], feeds)[0].astype(np.float64)

    def sample(self, z: np.ndarray) -> np.ndarray:
        return self.sessions["sample"].run(["x"], {"z": z.astype(np.float32, copy=False), "temperature": np.array(1.0, dtype=np.float32)})[0]


def choose_backend(manifest: Manifest, setting: str) -> str:
    """``FLOWSERVE_BACKEND`` wins; ``auto`` takes the manifest's ``preferred_backend``, else torch."""
    if setting != "auto":
        return setting
    return str(manifest.graphs.get("preferred_backend", "torch"))


def open_runner(path: Path, device: str, settings: Settings) -> Runner:
    """Open the artifact at ``path`` on ``device`` with the configured backend."""
    manifest = read_manifest(path)
    backend = choose_backend(manifest, settings.backend)
    if backend == "onnxruntime":
        return OnnxRunner(path, device, settings)
    if settings.require_gpu and not device.startswith("cuda"):
        raise RuntimeError(f"FLOWSERVE_REQUIRE_GPU=1 but the worker device is {device}")
    return TorchRunner(path, device)
