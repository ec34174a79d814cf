"""The GPU acceptance command (``bench/gpu.py --acceptance``) runs end to end on the CPU at small sizes: every step
runs, and its JSON lists every figure with its goal. Its numbers are not GPU figures (docs/gpu.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_acceptance_smoke_on_the_cpu_lists_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "acceptance.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--acceptance", "--device", "cpu", "--out", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["errors"] == {}
    assert {g["figure"] for g in report["goals"]} >= {
        "flowpp_cifar_tf32_images_per_s", "flowpp_cifar_tf32_peak_gib", "flowpp_cifar_bf16_images_per_s", "flowpp_cifar_bf16_peak_gib",
        "butterfly_fused_forward_ms", "digits_samples_per_s", "json_1row_best_rows_per_s", "json_1row_one_client_p50_ms",
        "batching_over_max_batch_1_worst", "pytest_cuda_failed"}
    figures = report["figures"]
    for name in ("pytest_cuda_passed", "pytest_cuda_failed", "butterfly_eager_forward_ms", "dense_lu_forward_ms", "dense_matmul_ms",
                 "flowpp_cifar_tf32_images_per_s", "flowpp_cifar_bf16_images_per_s", "training_run_steps",
                 "training_run_test_bits_per_dim", "digits_samples_per_s", "json_1row_best_rows_per_s",
                 "json_1row_one_client_p50_ms", "batching_over_max_batch_1_worst"):
        assert figures.get(name) is not None, name
    assert figures["training_run_steps"] == 3 and figures["pytest_cuda_failed"] == 0
    assert figures["json_1row_batching_8_errors"] == 0 and figures["json_1row_max_batch_1_8_errors"] == 0
    assert "| figure | value | goal | met |" in r.stdout
