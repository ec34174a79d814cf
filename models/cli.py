"""The model library's commands: train, evaluate, calibrate, sample, export, generate-cohort.

``flowserve`` (:mod:`service.cli`) is these plus ``serve``; ``python -m models.cli`` runs them
without the service installed.

User errors (bad files, bad configs) print one line to stderr and exit with status 2;
no traceback.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer

from .errors import FlowserveError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train normalizing flows and serve their exact densities.")


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn ``FlowserveError`` into one line on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FlowserveError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")


@app.command()
@user_errors
def train(
    config: Optional[Path] = typer.Argument(None, help="YAML training config (see configs/); or --preset"),
    preset: Optional[str] = typer.Option(None, "--preset", help="a config that ships with flowserve: tabular"),
    data: Optional[str] = typer.Option(None, "--data", help="data spec, e.g. csv:records.csv (overrides the config's)"),
    out: Path = typer.Option(None, "--out", help="output directory (default runs/<config or preset name>)"),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1, help="stop after N steps"),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu or cuda (overrides the config)"),
    seed: Optional[int] = typer.Option(None, "--seed", help="random seed (overrides the config)"),
    resume: bool = typer.Option(False, "--resume", help="continue from OUT/checkpoint.pt"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Train a flow; writes OUT/artifact, OUT/metrics.jsonl and OUT/samples.png (images)."""
    from . import presets
    from .errors import ConfigError
    from .training.loop import load_config
    from .training.loop import train as run

    _logging(verbose)
    if (config is None) == (preset is None):
        raise ConfigError("give a config file or --preset NAME (one of them)")
    path = config if config is not None else presets.path(preset)
    cfg = load_config(path)
    updates = {k: v for k, v in {"device": device, "seed": seed, "data": data}.items() if v is not None}
    if updates:
        cfg = cfg.model_validate({**cfg.model_dump(), **updates})
    out = out or Path("runs") / path.stem
    metrics = run(cfg, out, max_steps=max_steps, resume=resume, progress=sys.stderr.isatty())
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 reports (models.training.distributed)
        typer.echo(json.dumps(metrics, indent=2))
        typer.echo(f"artifact: {out / 'artifact'}")


@app.command("generate-cohort")
@user_errors
def generate_cohort(
    out: Path = typer.Argument(..., help="output directory"),
    patients: int = typer.Option(200, "--patients", min=4),
    hours: int = typer.Option(48, "--hours", min=2),
    windows: int = typer.Option(10, "--windows-per-patient", min=1),
    anomaly_fraction: float = typer.Option(0.1, "--anomaly-fraction", min=0.0, max=0.9),
    seed: int = typer.Option(0, "--seed"),
    csv_waveforms: bool = typer.Option(False, "--csv-waveforms", help="write waveform CSV exports instead of WFDB records"),
) -> None:
    """Write a synthetic MIMIC-style cohort (never patient data): benchmark vitals CSVs, WFDB waveforms, labelled test sets."""
    from .data.mimic import write_cohort

    counts = write_cohort(out, patients, hours, windows, anomaly_fraction, seed, wfdb_records=not csv_waveforms)
    typer.echo(f"wrote a synthetic cohort to {out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


@app.command()
@user_errors
def evaluate(
    artifact_dir: Path = typer.Argument(..., metavar="ARTIFACT"),
    data: Optional[str] = typer.Option(None, "--data", help="data spec (default: the one the model was trained on)"),
    split: str = typer.Option("test", "--split"),
    iw_samples: int = typer.Option(1, "--iw-samples", min=1, help="importance-weighted bound with S samples"),
    seed: Optional[int] = typer.Option(None, "--seed", help="dequantization noise seed (default: the training run's)"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Bits/dim and NLL (nats per example) of an artifact on a dataset split."""
    from .artifacts.store import load
    from .data import load_dataset
    from .errors import DataError
    from .training.evaluate import evaluate as run

    model = load(artifact_dir)
    metrics = model.manifest.metrics
    dataset = load_dataset(data or model.spec.source)
    if dataset.spec.shape != model.spec.shape:
        raise DataError(f"data {dataset.spec.source!r} has shape {dataset.spec.shape}, the model expects {model.spec.shape}")
    result = run(
        model,
        dataset.split(split),
        batch_size=batch_size or metrics.get("eval_batch", 512),
        seed=seed if seed is not None else metrics.get("eval_seed", 0),
        iw_samples=iw_samples,
    )
    result["split"] = split
    if as_json:
        typer.echo(json.dumps(result))
    else:
        typer.echo(f"{split}: {result['bits_per_dim']:.4f} bits/dim, NLL {result['nll_nats']:.3f} nats "
                   f"({result['bound']} bound, {result['examples']} examples)")


@app.command()
@user_errors
def calibrate(
    artifact_dir: Path = typer.Argument(..., metavar="ARTIFACT"),
    data: Optional[str] = typer.Option(None, "--data", help="calibration records, e.g. csv:normal.csv (default: the training "
                                       "data's validation split); every record of another data spec is used"),
    statistic: Optional[str] = typer.Option(None, "--statistic", help="nll, typicality or conditional (default: the model's)"),
    split: Optional[str] = typer.Option(None, "--split", help="use only this split of DATA"),
) -> None:
    """Recalibrate a record or waveform model's anomaly scores in place, without retraining."""
    from .anomaly.calibration import recalibrate

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = recalibrate(artifact_dir, data, statistic, split)
    except ValueError as e:
        from .errors import DataError

        raise DataError(str(e)) from None
    typer.echo(f"calibrated on {out['n']} records ({out['split']}), statistic {out['statistic']}, "
               f"p-value resolution {out['p_value_resolution']:.4g}")


@app.command()
@user_errors
def sample(
    artifact_dir: Path = typer.Argument(..., metavar="ARTIFACT"),
    n: int = typer.Option(64, "-n", min=1, max=100_000),
    temperature: float = typer.Option(1.0, "--temperature", min=0.0),
    seed: int = typer.Option(0, "--seed"),
    out: Path = typer.Option(..., "--out", help="FILE.png (image grid) or FILE.npy"),
) -> None:
    """Draw samples; a PNG grid for image models, or an NPY array."""
    import numpy as np
    import torch

    from .artifacts.store import load
    from .errors import FlowserveError as Err

    model = load(artifact_dir)
    x = model.sample(n, temperature, torch.Generator().manual_seed(seed)).cpu().numpy()
    if not np.isfinite(x).all():
        raise Err("sampling produced non-finite values; try a lower temperature")
    if out.suffix == ".npy":
        np.save(out, x)
    elif out.suffix == ".png":
        if model.spec.kind != "image":
            raise Err("PNG output needs an image model; use FILE.npy")
        from .imageio import save_grid

        save_grid(x, model.spec.levels or 256, out)
    else:
        raise Err(f"{out}: output must end in .png or .npy")
    typer.echo(f"wrote {n} samples to {out}")


@app.command()
@user_errors
def export(
    artifact_dir: Path = typer.Argument(..., metavar="ARTIFACT"),
    opset: int = typer.Option(17, "--opset", min=13, help="ONNX opset"),
    triton: Optional[Path] = typer.Option(None, "--triton", help="also write a Triton model repository here"),
    name: Optional[str] = typer.Option(None, "--name", help="model name in the Triton repository"),
    prefer: bool = typer.Option(False, "--prefer-onnx", help="mark ONNX Runtime as this model's preferred backend"),
) -> None:
    """Add ONNX scoring and sampling graphs to an artifact (and optionally a Triton repository)."""
    from .artifacts.export import export_artifact, export_triton

    _logging(False)
    graphs = export_artifact(artifact_dir, opset=opset, prefer=prefer)
    typer.echo(f"exported score.onnx and sample.onnx to {artifact_dir} (parity vs PyTorch: {graphs.parity})")
    if triton is not None:
        typer.echo(f"Triton model repository: {export_triton(artifact_dir, triton, name)}")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
