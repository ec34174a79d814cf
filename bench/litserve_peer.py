"""The peer for ``bench/serving.py``: the same model behind LitServe, a FastAPI-based batching server.

It scores what flowserve's ``POST /v1/models/<name>/score`` scores, the same way: JSON
``{"instances": [...], "seed": s}`` → the same validated float32 rows, the same seeded
dequantization noise, the same runner (``service.executor.runners.open_runner``, same backend; torch eager, as
a LitServe user would call the model, not flowserve's traced graph), answered
as ``{"results": [{"log_prob", "bits_per_dim"}]}``. LitServe batches across requests
(``max_batch_size`` as flowserve's, its default ``batch_timeout`` of 0) and runs its default
API-server processes. Usage: ``python bench/litserve_peer.py ARTIFACT PORT MAX_BATCH BACKEND THREADS``.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import litserve as ls
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.core.tasks import dequantization_noise  # noqa: E402
from service.executor.runners import open_runner  # noqa: E402
from service.frontend.api.inputs import instances_to_array  # noqa: E402
from service.settings import Settings  # noqa: E402


class FlowAPI(ls.LitAPI):
    def __init__(self, artifact: str, backend: str, threads: int, max_batch_size: int) -> None:
        super().__init__(max_batch_size=max_batch_size)
        self.artifact, self.backend, self.threads = artifact, backend, threads

    def setup(self, device: str) -> None:
        torch.set_num_threads(self.threads)
        # the model as it is, as a LitServe user would run it: eager torch (no traced graph), no tiles for batch-invariant results
        self.runner = open_runner(Path(self.artifact), "cpu", Settings(backend=self.backend, ort_threads=self.threads,
                                                                        batch_invariant=False, trace_cpu=False))
        self.manifest = self.runner.manifest
        self.dims = self.manifest.data_spec.dims

    def decode_request(self, request: dict) -> tuple[np.ndarray, np.ndarray | None]:
        x = instances_to_array(request["instances"], self.manifest.data_spec)
        return x, dequantization_noise(self.manifest, len(x), int(request.get("seed", 0)))

    def batch(self, inputs: list) -> list:
        return inputs

    def predict(self, inputs: list) -> list[np.ndarray]:
        sizes = [len(x) for x, _ in inputs]
        x = np.concatenate([x for x, _ in inputs])
        noise = None if inputs[0][1] is None else np.concatenate([n for _, n in inputs])
        out = self.runner.log_prob(x, noise)
        return np.split(out, np.cumsum(sizes)[:-1])

    def unbatch(self, output: list) -> list:
        return output

    def encode_response(self, log_prob: np.ndarray) -> dict:
        scale = self.dims * math.log(2)
        return {"results": [{"log_prob": float(v), "bits_per_dim": float(-v / scale)} for v in log_prob]}


def main() -> None:
    artifact, port, max_batch, backend, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
    server = ls.LitServer(FlowAPI(artifact, backend, threads, max_batch), accelerator="cpu")
    server.run(port=port, host="127.0.0.1", log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
