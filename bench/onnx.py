"""PyTorch eager vs ONNX Runtime: scoring rows/s at batch 1, 16, 256, and the parity table.

Usage: ``python bench/onnx.py [--seconds 2]``. Uses the bundled digits Glow plus tiny RealNVP
and vector flows; exports into a temporary copy. CPU, or CUDA when available.
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file is named like the `onnx` package: keep its folder off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.artifacts import store as artifact  # noqa: E402
from models.artifacts.export import export_artifact, parity, random_inputs  # noqa: E402


def rows_per_s(fn, batch: int, seconds: float) -> float:  # noqa: ANN001
    fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += batch
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=2.0)
    args = ap.parse_args()
    import onnxruntime as ort

    device = "cuda" if torch.cuda.is_available() else "cpu"
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "digits"
        shutil.copytree(ROOT / "model_repository" / "digits" / "1", path)
        export_artifact(path)
        model = artifact.load(path, device)
        sess = ort.InferenceSession(str(path / "score.onnx"), providers=providers)
        print(f"device {device}; torch threads {torch.get_num_threads()}; onnxruntime {ort.__version__} {sess.get_providers()[0]}")
        print(f"{'batch':>6} {'torch rows/s':>14} {'onnxruntime rows/s':>20} {'ratio ort/torch':>16}")
        for batch in (1, 16, 256):
            feeds = random_inputs(model.cpu(), batch)
            model.to(device)
            x, noise = torch.from_numpy(feeds["x"]).to(device), torch.from_numpy(feeds["noise"]).to(device)

            def eager() -> None:
                with torch.inference_mode():
                    model.log_prob(x, noise)
                if device == "cuda":
                    torch.cuda.synchronize()

            t = rows_per_s(eager, batch, args.seconds)
            o = rows_per_s(lambda: sess.run(["log_prob"], feeds), batch, args.seconds)
            print(f"{batch:>6} {t:>14.0f} {o:>20.0f} {o / t:>16.2f}")
        model.cpu()
        print("\nparity on fresh random inputs (32 rows):")
        print(f"{'architecture':>14} {'log_prob rel err':>18} {'sample err':>12}")
        print(f"{'glow (bundled)':>14} {parity(model, path, 32, 7)['log_prob_rel_err']:>18.2e} {parity(model, path, 32, 7)['sample_err']:>12.3g}")
        from tests.test_onnx import ARCHS, _artifact

        for arch in sorted(ARCHS):
            p = _artifact(Path(tmp) / "archs", arch)
            export_artifact(p)
            e = parity(artifact.load(p), p, 32, 7)
            print(f"{arch:>14} {e['log_prob_rel_err']:>18.2e} {e['sample_err']:>12.3g}")


if __name__ == "__main__":
    main()
