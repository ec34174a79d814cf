"""Rebuild the bundled default models that ``make serve`` serves: ``python -m models.training.bundle ROOT``.

Each entry trains one shipped config with its seed, writes ``ROOT/<name>/1/``, adds the ONNX
graphs and marks ONNX Runtime as the preferred backend (faster than eager PyTorch on CPU;
``docs/benchmarks.md``).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from ..artifacts.export import export_artifact
from .loop import load_config, train

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# Record models are served by PyTorch: their float32 ONNX scores differ by ~2e-4 relative (over the
# export's 1e-4 parity bar) and they are cheap enough not to need ONNX Runtime.
NO_ONNX = {"mimic-vitals", "mimic-waveform"}

BUNDLE: dict[str, str] = {
    "digits": "glow_digits.yaml",
    "digits-flowpp": "flowpp_digits.yaml",
    "mimic-vitals": "mimic_vitals.yaml",
    "mimic-waveform": "mimic_waveform.yaml",
}


def build_bundle(root: Path, names: list[str] | None = None) -> None:
    for name, config in BUNDLE.items():
        if names and name not in names:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            metrics = train(load_config(CONFIGS / config), tmp, progress=False)
            dest = root / name / "1"
            shutil.rmtree(dest, ignore_errors=True)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(Path(tmp) / "artifact", dest)
        if name not in NO_ONNX:
            export_artifact(dest, prefer=True)
        print(f"{name}: {config} -> {dest} (test {metrics['test_bits_per_dim']:.4f} bits/dim)")


if __name__ == "__main__":
    build_bundle(Path(sys.argv[1] if len(sys.argv) > 1 else "model_repository"), sys.argv[2:] or None)
