"""The command line end to end, in fresh processes: train → evaluate → sample, and user errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import TINY_GLOW


def flowserve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "models.cli", *args], capture_output=True, text=True, timeout=300)


def assert_user_error(r: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and fragment in lines[0], r.stderr


def test_evaluate_in_fresh_process_matches_manifest(tiny_glow_run: Path) -> None:
    art = tiny_glow_run / "artifact"
    manifest = json.loads((art / "manifest.json").read_text())
    r = flowserve("evaluate", str(art), "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert abs(result["bits_per_dim"] - manifest["metrics"]["test_bits_per_dim"]) < 1e-3
    assert result["bound"] == "variational"


def test_sample_png_and_npy(tiny_glow_run: Path, tmp_path: Path) -> None:
    art = str(tiny_glow_run / "artifact")
    r = flowserve("sample", art, "-n", "16", "--temperature", "0.7", "--seed", "1", "--out", str(tmp_path / "s.npy"))
    assert r.returncode == 0, r.stderr
    x = np.load(tmp_path / "s.npy")
    assert x.shape == (16, 1, 8, 8) and np.isfinite(x).all() and x.min() >= 0 and x.max() <= 16
    r = flowserve("sample", art, "-n", "16", "--out", str(tmp_path / "s.png"))
    assert r.returncode == 0 and (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_train_cli_writes_artifact_and_metrics(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(TINY_GLOW))
    r = flowserve("train", str(cfg), "--out", str(tmp_path / "run"), "--max-steps", "5")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "run/artifact/manifest.json").is_file()
    lines = (tmp_path / "run/metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["final"]["steps"] == 5
    assert (tmp_path / "run/samples.png").is_file()


def test_missing_data_directory(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({**TINY_GLOW, "data": f"mnist:{tmp_path / 'nope'}"}))
    assert_user_error(flowserve("train", str(cfg), "--out", str(tmp_path / "o")), "data directory not found")


def test_truncated_idx_file(tmp_path: Path) -> None:
    from tests.test_data import write_idx

    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((8, 28, 28)))
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((4, 28, 28)))
    p = tmp_path / "t10k-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:100])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({**TINY_GLOW, "data": f"mnist:{tmp_path}"}))
    assert_user_error(flowserve("train", str(cfg), "--out", str(tmp_path / "o")), "truncated IDX file")


def test_unknown_config_key(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({**TINY_GLOW, "model": {**TINY_GLOW["model"], "hiddn": 3}}))
    assert_user_error(flowserve("train", str(cfg)), "model.glow.hiddn: Extra inputs are not permitted")


def test_tampered_weights(tiny_glow_run: Path, tmp_path: Path) -> None:
    import shutil

    art = tmp_path / "artifact"
    shutil.copytree(tiny_glow_run / "artifact", art)
    w = art / "weights.safetensors"
    raw = bytearray(w.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    w.write_bytes(bytes(raw))
    assert_user_error(flowserve("evaluate", str(art)), "checksum mismatch")


CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def test_configs_are_found() -> None:
    assert len(CONFIGS) >= 5, CONFIGS


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_validate(config: Path) -> None:
    from models.training.loop import load_config

    load_config(config)


def test_resume_continues_from_checkpoint(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({**TINY_GLOW, "train": {**TINY_GLOW["train"], "steps": 20, "eval_every": 10}}))
    out = tmp_path / "run"
    assert flowserve("train", str(cfg), "--out", str(out), "--max-steps", "10").returncode == 0
    r = flowserve("train", str(cfg), "--out", str(out), "--resume")
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [rec["step"] for rec in records if "step" in rec]
    assert steps == [10, 20]  # first run validates at step 10, the resumed run at 20
    assert json.loads((out / "artifact" / "manifest.json").read_text())["metrics"]["steps"] == 20


def test_resumed_run_continues_the_same_batch_sequence(tmp_path: Path) -> None:
    """Interrupted at step 10 and resumed, a run ends with the same weights as one that ran 20 steps straight:
    the checkpoint restores the torch RNG and the numpy batch generator, not only the model and optimiser."""
    from safetensors.numpy import load_file

    from models.training.loop import TrainConfig, train

    cfg = TrainConfig.model_validate({**TINY_GLOW, "train": {**TINY_GLOW["train"], "steps": 20, "eval_every": 10}})
    train(cfg, tmp_path / "straight", progress=False)
    train(cfg, tmp_path / "resumed", max_steps=10, progress=False)
    train(cfg, tmp_path / "resumed", resume=True, progress=False)
    a = load_file(str(tmp_path / "straight" / "artifact" / "weights.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "artifact" / "weights.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    ck = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert set(ck["rng"]) == {"torch", "cuda", "batches"} and ck["rng"]["batches"]["bit_generator"] == "PCG64"


def test_doctor_reports_versions_capabilities_and_each_models_path(repository: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "service.cli", "doctor", "--repository", str(repository)], capture_output=True,
                       text=True, timeout=300)  # the `flowserve` command: doctor loads models as the service does
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.index("versions:") < out.index("capabilities:") < out.index("models:")
    assert any(ln.split()[:2] == ["torch", torch.__version__] for ln in out.splitlines())
    for capability in ("TF32 matmul/conv", "bf16", "flash SDPA", "CUDA graphs", "fused Triton butterfly", "ONNX Runtime CUDA provider"):
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(capability))
        if not torch.cuda.is_available():
            assert "no  (no CUDA device)" in line, line  # says what is absent, and why
    digits = [ln for ln in out.splitlines() if ln.strip().startswith("digits 1 ")]
    assert {ln.split()[2] for ln in digits} == {"score", "sample"} and all("on cpu" in ln or "on cuda" in ln for ln in digits)
    assert any(ln.strip().startswith("broken 1") and "failed" in ln for ln in out.splitlines())
