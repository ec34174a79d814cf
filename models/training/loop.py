"""Training: pydantic-validated YAML configs, Adam with warm-up, clipping, EMA, best-checkpoint selection."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from tqdm import tqdm

from ..artifacts import store as artifact
from ..architectures import ArchitectureConfig, build, sized_for
from ..anomaly.scoring import FEW_CALIBRATION
from ..data import Dataset, load_dataset
from ..density import DensityModel
from .distributed import World, from_env, leave, restarted
from .ema import EMA
from ..errors import ConfigError, FlowserveError
from .evaluate import evaluate
from ..flows import data_init
from ..flows.base import reducible_init
from ..precision import Precision, enable_tf32, set_precision

log = logging.getLogger(__name__)


class TrainingError(FlowserveError):
    """Training cannot go on (e.g. the loss stayed non-finite)."""


class OptimConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: int = Field(2000, ge=1)
    max_minutes: float | None = Field(None, gt=0, description="stop after this wall-clock budget")
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    warmup: int = Field(100, ge=0, description="linear warm-up steps")
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0, description="global gradient-norm clip")
    ema: float = Field(0.999, ge=0, lt=1, description="Polyak/EMA decay for evaluation and export")
    init_batch: int = Field(256, ge=1, description="examples for data-dependent initialisation")
    eval_every: int = Field(250, ge=1)
    checkpoint_every: int | None = Field(None, ge=1, description="write the checkpoint (atomically) every this many steps "
                                         "(default: at each evaluation)")
    patience: int | None = Field(None, ge=1, description="stop after this many evaluations without a better validation "
                                 "likelihood (default: never stop early)")
    eval_batch: int = Field(512, ge=1)
    max_nonfinite: int = Field(20, ge=1, description="consecutive non-finite losses before giving up")
    log_every: int | None = Field(None, ge=1, description="also write the training loss (bits/dim of the global batch) to "
                                  "metrics.jsonl every this many steps (each a host read; default: never)")
    micro_batch: int | None = Field(None, ge=1, description="rows per forward/backward pass; gradients accumulate to "
                                    "batch_size (default: as many as fit in memory_gb, measured on a probe step)")
    memory_gb: float | None = Field(None, gt=0, description="memory the run may hold at its peak: the process's resident "
                                    "memory on the CPU, its tensors on a GPU (default: 80% of what is available when training starts)")


class CalibrationConfig(BaseModel):
    """How many held-out normal records calibrate the anomaly scores (record and waveform data)."""

    model_config = ConfigDict(extra="forbid")
    fraction: float | None = Field(None, gt=0, lt=1, description="share of the training and validation records held out "
                                   "to calibrate (default: the loader's validation split; csv: 5%)")
    min_records: int = Field(100, ge=1, description="hold out at least this many (at most half the records); fewer than "
                             "100 give p-values no finer than 1/(n + 1), and training warns")


class TrainConfig(BaseModel):
    """A training run: data spec, architecture, optimisation."""

    model_config = ConfigDict(extra="forbid")
    data: str = "digits"
    model: ArchitectureConfig
    train: OptimConfig = OptimConfig()
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Precision = Field("fp32", description="bf16: the conditioner networks run under autocast, every bijector and "
                                 "log-determinant in float32 (models.precision)")
    compile: bool = Field(False, description="torch.compile the training loss (one graph per batch shape); see README for "
                          "where it pays")
    anomaly_statistic: Literal["nll", "typicality", "conditional"] = Field(
        "nll", description="record and waveform models: the anomaly statistic a request gets by default (models.anomaly.scoring)")
    calibration: CalibrationConfig = CalibrationConfig()


def load_config(path: str | Path) -> TrainConfig:
    """Read and validate a YAML config; errors name the offending key in one line."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    try:
        return TrainConfig.model_validate(raw or {})
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"{path}: {loc}: {err['msg']}") from None


def calibration_split(data: Dataset, cfg: CalibrationConfig, seed: int = 0) -> Dataset:
    """Move records between the training and validation splits so that the validation split (the
    anomaly calibration) holds ``cfg.fraction`` of them and at least ``cfg.min_records`` (at most half).

    Only for record and waveform data split without groups (``csv:``, ``waveform:``); data split
    by patient (``Dataset.grouped``: the MIMIC loaders) keep their split, because calibration
    records must come from patients the model never saw.
    """
    if data.spec.kind == "image":
        return data
    train, val = data.split("train"), data.split("val")
    total = len(train) + len(val)
    want = max(math.ceil(cfg.fraction * total) if cfg.fraction else len(val), min(cfg.min_records, total // 2))
    if want != len(val) and not data.grouped:
        data = data.with_held_out(want, seed)
        log.info("calibration: %d of %d records held out (fraction %s, min_records %d)", want, total, cfg.fraction, cfg.min_records)
    n = len(data.split("val"))
    if n < FEW_CALIBRATION:
        log.warning("only %d calibration records: anomaly p-values have a resolution of 1/%d (no record is flagged at a "
                    "target_fpr below that); set calibration.min_records or calibrate on more records with `flowserve calibrate`", n, n + 1)
    return data


PROBE_ROWS = 8  # rows of the step that measures the memory a row takes
DEVICE_DATA_FRACTION = 0.25  # training data this share of the device's memory or less lives on it


def batch_source(train_x: np.ndarray, device: torch.device):  # noqa: ANN201 - Callable[[np.ndarray], Tensor]
    """``idx (B,) -> x (B, *shape)`` on ``device``. On a GPU, data that fits (a quarter of its memory) is copied
    there once and batches are gathered on the device; otherwise batches are gathered on the host into pinned
    memory and copied with ``non_blocking``. On the CPU: plain indexing."""
    if device.type != "cuda":
        return lambda idx: torch.from_numpy(train_x[idx])
    if train_x.nbytes <= DEVICE_DATA_FRACTION * torch.cuda.get_device_properties(device).total_memory:
        on_device = torch.from_numpy(train_x).to(device)
        return lambda idx: on_device[torch.from_numpy(idx).to(device, non_blocking=True)]
    return lambda idx: torch.from_numpy(train_x[idx]).pin_memory().to(device, non_blocking=True)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but no CUDA device is available")
    return torch.device(device)


def _lr_lambda(warmup: int):  # noqa: ANN202
    return lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0


def _rng_state(batches: np.random.Generator) -> dict[str, Any]:
    """Every random state a resumed run needs: torch CPU and CUDA, and the numpy batch generator."""
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "batches": batches.bit_generator.state}


def _restore_rng(state: dict[str, Any] | torch.Tensor, batches: np.random.Generator) -> None:
    if isinstance(state, torch.Tensor):  # checkpoints written before the batch generator was saved
        torch.set_rng_state(state)
        return
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    batches.bit_generator.state = state["batches"]


def _save_checkpoint(path: Path, step: int, model: DensityModel, ema: EMA, opt, sched, best: dict,  # noqa: ANN001
                     batches: np.random.Generator) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(
        {"step": step, "model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
         "sched": sched.state_dict(), "best": best, "rng": _rng_state(batches)},
        tmp,
    )
    tmp.replace(path)


def _loss_fn(model: DensityModel, compile: bool):  # noqa: ANN202 - Callable[[Tensor], Tensor]
    """Mean bits/dim of a batch (the training loss), compiled with ``torch.compile`` when asked."""
    def loss(x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        return model.bits_per_dim(x, noise).mean()

    return torch.compile(loss, dynamic=False) if compile else loss


def plan_micro_batch(loss_fn, model: DensityModel, probe: torch.Tensor, oc: OptimConfig,  # noqa: ANN001
                     device: torch.device) -> tuple[int, bool]:
    """Rows per forward/backward pass so a step fits in ``oc.memory_gb`` (or 80% of the available
    memory), and whether memory is tight (the planned step takes more than half the budget).

    One forward/backward pass on the probe rows measures the memory a row takes (the RNG states are
    restored and the gradients dropped afterwards, so the run itself is unchanged). A run where even
    one row does not fit stops here with a :class:`TrainingError` that says how much it needs.
    """
    from .memory import GB, available_bytes, in_use_bytes, peak_growth

    limits = []
    if oc.memory_gb:  # the whole process (CPU) or its tensors on the device (CUDA)
        limits.append(oc.memory_gb * GB - (in_use_bytes(device) or 0))
    available = available_bytes(device)
    if available:
        limits.append(0.8 * available)
    if not limits:
        return oc.batch_size, False
    budget = min(limits)
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if device.type == "cuda" else None
    with peak_growth(device) as grown:
        loss_fn(probe).backward()
    model.zero_grad(set_to_none=True)
    torch.set_rng_state(cpu_rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state_all(cuda_rng)
    if grown() is None:
        return oc.batch_size, False
    per_row = max(grown() / len(probe), 1.0)
    if per_row > budget:
        raise TrainingError(f"a training step needs about {per_row / GB:.2f} GB per example and only {max(budget, 0) / GB:.2f} GB are "
                            f"{'allowed (train.memory_gb)' if oc.memory_gb else 'available'}; use a smaller model or more memory")
    micro = max(1, min(oc.batch_size, int(0.75 * budget // per_row)))  # a quarter kept back for what the probe cannot see
    log.info("training step: %.3f GB per example measured, %.1f GB budget: %s", per_row / GB, budget / GB,
             "whole batches" if micro >= oc.batch_size else f"micro-batches of {micro} of the {oc.batch_size} rows")
    return micro, micro < oc.batch_size or micro * per_row > 0.5 * budget


def sample_grid(model: DensityModel, path: Path, n: int = 64, temperature: float = 1.0, seed: int = 0) -> None:
    """Write an ``n``-sample grid PNG (images only)."""
    from ..imageio import save_grid

    x = model.sample(n, temperature, torch.Generator().manual_seed(seed)).cpu().numpy()
    save_grid(x, model.spec.levels or 256, path)


@dataclass
class _Run:
    """One training run's state, passed from :func:`_prepare` to :func:`_fit` to :func:`_finish`."""

    cfg: TrainConfig
    out: Path
    device: torch.device
    data: Dataset
    model: DensityModel
    steps: int  # the last step (``train.steps``, or fewer with ``max_steps``)
    rng: np.random.Generator  # batch indices (and the data-dependent init's sample)
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    ema: EMA
    loss_fn: Any  # Callable[[Tensor], Tensor]: mean bits/dim of a batch
    batches: Any  # Callable[[np.ndarray], Tensor]: a batch of training rows by index
    micro: int  # rows per forward/backward pass
    best: dict[str, Any] = field(default_factory=lambda: {"val_bits_per_dim": math.inf, "step": 0})
    best_state: dict[str, torch.Tensor] | None = None
    start_step: int = 0
    last_step: int = 0
    skipped_steps: Any = None  # (,) long tensor on the device
    t0: float = 0.0
    world: World = field(default_factory=World)  # this process's rank in a data-parallel job (models.training.distributed)
    ddp: Any = None  # DistributedDataParallel around the training objective, when there are several ranks

    @property
    def initial_model(self) -> str | None:
        """A closed-form model the flow starts as, evaluated as a candidate (the tabular flow: its Gaussian)."""
        return getattr(self.cfg.model, "initial_model", None)

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"

    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"


def train(cfg: TrainConfig, out: str | Path, max_steps: int | None = None, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train, select the best EMA weights by validation bits/dim, write the artifact to ``out/artifact``.

    Three steps: :func:`_prepare` (data, model sized and data-initialised, optimiser, resumed state),
    :func:`_fit` (the steps, with validation, checkpoints and early stopping) and :func:`_finish`
    (the selected weights evaluated, calibrated and saved). Returns the final metrics (validation
    and test bits/dim of the selected weights).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run = _prepare(cfg, out, max_steps, resume or restarted())
    try:
        _fit(run, progress and run.world.main)
        return _finish(run)
    finally:
        leave(run.world)


def _prepare(cfg: TrainConfig, out: Path, max_steps: int | None, resume: bool) -> _Run:
    """Load and split the data, build the model at the sizes the data asks for, run its data-dependent
    initialisation, make the optimiser, schedule and EMA, restore a checkpoint when resuming, and plan
    the micro-batches."""
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    world = from_env(device)
    device = world.device(device)
    if cfg.train.batch_size % world.size:
        raise ConfigError(f"train.batch_size {cfg.train.batch_size} does not divide by the {world.size} ranks of this job; "
                          "batch_size is the global batch, shared equally by the ranks")
    if device.type == "cuda":
        enable_tf32()  # the precision policy: models.precision
    data = load_dataset(cfg.data)
    if cfg.anomaly_statistic == "conditional" and data.spec.kind != "record":
        raise ConfigError(f"anomaly_statistic: 'conditional' is for record data, not {data.spec.kind} ({cfg.data})")
    data = calibration_split(data, cfg.calibration, cfg.seed)
    train_x = data.split("train")
    cfg = cfg.model_copy(update={"model": sized_for(cfg.model, len(train_x), data.spec.dims)})
    model = build(cfg.model, data.spec).to(device)
    oc = cfg.train

    rng = np.random.default_rng(cfg.seed)
    init_idx = rng.choice(len(train_x), size=min(oc.init_batch, len(train_x)), replace=False)
    model.train()
    init_x = torch.from_numpy(train_x[init_idx]).to(device)
    noise = model.noise(len(init_x))  # drawn as log_prob draws it, for the whole batch on every rank (same seed)
    # A data-parallel job initialises on each rank's part of the batch, the layers' moments summed over the ranks; a
    # model with a layer whose init is not a sum of moments (the tabular flow's Yeo-Johnson fit and cross-validated
    # whitening) initialises on the whole batch on every rank. Either way every rank sets what one process sets.
    part = world.share(len(init_x)) if world.distributed and reducible_init(model) else slice(None)
    with data_init(model, world.all_sum if part != slice(None) else None), torch.no_grad():  # no layer checks for it
        model.log_prob(init_x[part], None if noise is None else noise[part])
    set_precision(model, cfg.precision)

    # Fused Adam skips a step on the device when told the gradients are not finite (``found_inf``):
    # the guard against non-finite losses needs no host read per step.
    opt = torch.optim.Adam(model.parameters(), lr=oc.lr, weight_decay=oc.weight_decay, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(oc.warmup))
    ema = EMA(model, oc.ema)
    batches = batch_source(train_x, device)
    run = _Run(cfg, out, device, data, model, min(oc.steps, max_steps) if max_steps else oc.steps, rng, opt, sched, ema,
               _loss_fn(model, cfg.compile), batches, oc.micro_batch or 0, world=world)
    if resume and run.checkpoint_path.is_file():
        _resume(run)
    elif not resume and world.main:
        run.metrics_path.unlink(missing_ok=True)

    tight = False
    if not oc.micro_batch:
        run.micro, tight = plan_micro_batch(run.loss_fn, model, batches(np.arange(min(PROBE_ROWS, len(train_x)))), oc, device)
        run.micro = world.min(run.micro, device)  # every rank takes the smallest plan: the ranks step in the same micro-batches
    if world.distributed:  # wrapped after the data-dependent initialisation
        from torch.nn.parallel import DistributedDataParallel

        run.ddp = DistributedDataParallel(_Objective(model), device_ids=[device.index] if device.type == "cuda" else None)
        run.loss_fn = run.ddp
    if device.type == "cpu" and tight:  # memory is a limit: keep the resident memory to what the step holds
        from .memory import return_large_blocks_to_the_os

        return_large_blocks_to_the_os()
    run.skipped_steps = torch.zeros((), dtype=torch.long, device=device)
    return run


class _Objective(torch.nn.Module):
    """The training loss as a module's ``forward``, for ``DistributedDataParallel`` to wrap: mean bits/dim of a batch."""

    def __init__(self, model: DensityModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.bits_per_dim(x, noise).mean()


def _resume(run: _Run) -> None:
    """Restore model, EMA, optimiser, schedule, best so far, random states and step from the checkpoint."""
    ck = torch.load(run.checkpoint_path, map_location=run.device, weights_only=True)  # restricted unpickler
    run.model.load_state_dict(ck["model"])
    run.ema.load_state_dict(ck["ema"])
    run.opt.load_state_dict(ck["opt"])
    run.sched.load_state_dict(ck["sched"])
    run.best = ck["best"]
    _restore_rng(ck["rng"], run.rng)
    run.start_step = ck["step"]
    if (run.out / "best.safetensors").is_file():
        from safetensors.torch import load_file

        run.best_state = load_file(str(run.out / "best.safetensors"))
    log.info("resumed from step %d", run.start_step)


def _validate(run: _Run, step: int, bar: tqdm) -> None:
    """Validation bits/dim of the EMA weights, logged to ``metrics.jsonl``; the best weights so far are kept."""
    ema_model: DensityModel = run.ema.module  # type: ignore[assignment]
    val = evaluate(ema_model, run.data.split("val"), run.cfg.train.eval_batch, seed=run.cfg.seed, world=run.world)
    record = {"step": step, "val_bits_per_dim": val["bits_per_dim"], "elapsed_s": time.monotonic() - run.t0,
              "skipped_steps": int(run.skipped_steps)}
    if run.world.main:
        with run.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
    if val["bits_per_dim"] < run.best["val_bits_per_dim"]:
        run.best.update(val_bits_per_dim=val["bits_per_dim"], step=step)
        run.best_state = {k: v.detach().cpu().clone() for k, v in ema_model.state_dict().items()}
        if run.world.main:
            from safetensors.torch import save_file

            save_file(run.best_state, str(run.out / "best.safetensors"))
    bar.set_postfix_str(f"val {val['bits_per_dim']:.3f} best {run.best['val_bits_per_dim']:.3f}", refresh=False)


def _step(run: _Run, x: torch.Tensor, noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step on the batch ``x`` with its dequantization ``noise`` (in micro-batches when planned); returns
    the batch's mean bits/dim and whether the step was skipped (a non-finite loss or gradient), both on the device."""
    run.opt.zero_grad(set_to_none=True)
    if run.micro >= len(x):
        bpd = run.loss_fn(x, noise)
        bpd.backward()
    else:  # gradients of the whole batch's mean, accumulated over micro-batches (synchronised across ranks once, at the last)
        bpd = torch.zeros((), device=run.device)
        for i in range(0, len(x), run.micro):
            last = i + run.micro >= len(x)
            with run.ddp.no_sync() if run.ddp is not None and not last else contextlib.nullcontext():
                part = run.loss_fn(x[i : i + run.micro], None if noise is None else noise[i : i + run.micro]) * (len(x[i : i + run.micro]) / len(x))
                part.backward()
            bpd = bpd + part.detach()
    norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.train.grad_clip, foreach=True)
    bad = ~(torch.isfinite(bpd) & torch.isfinite(norm))  # a non-finite loss or gradient: the step is skipped
    if run.world.distributed:  # skipped on every rank when on any; the loss of the global batch
        flags = run.world.all_sum(torch.stack([bad.double(), bpd.detach().double()]))
        bad, bpd = flags[0] > 0, (flags[1] / run.world.size).float()
    run.opt.found_inf = bad.float()
    run.opt.step()
    run.sched.step()
    run.ema.update(run.model)
    return bpd, bad


def _fit(run: _Run, progress: bool) -> None:
    """Train from ``run.start_step``: validate every ``eval_every`` steps (and the initial model first, when the
    architecture has one), checkpoint, and stop at the last step, the time budget or ``patience``."""
    oc, dims = run.cfg.train, run.data.spec.dims
    train_x = run.data.split("train")
    nonfinite = torch.zeros((), dtype=torch.long, device=run.device)  # consecutive non-finite steps, on the device
    run.t0 = time.monotonic()
    bar = tqdm(range(run.start_step, run.steps), initial=run.start_step, total=run.steps, disable=not progress, dynamic_ncols=True)
    run.last_step = run.start_step
    if run.initial_model is not None and run.start_step == 0:  # the initial model is a candidate like any evaluated step
        _validate(run, 0, bar)
        run.best["initial_val_bits_per_dim"] = run.best["val_bits_per_dim"]
    for step in bar:
        run.last_step = step
        run.model.train()
        # The global batch and its dequantization noise, drawn alike on every rank; each trains on its share.
        idx = run.rng.integers(0, len(train_x), oc.batch_size)
        noise = run.model.noise(oc.batch_size)
        share = run.world.share(oc.batch_size)
        bpd, bad = _step(run, run.batches(idx[share]), None if noise is None else noise[share])
        nonfinite = (nonfinite + 1) * bad
        run.skipped_steps += bad
        if step % 10 == 0:  # the one host read of the loop, every 10 steps
            loss, bad_run = bpd.item(), int(nonfinite)
            if bad_run >= oc.max_nonfinite:
                raise TrainingError(f"loss was non-finite for {bad_run} steps in a row at step {step}; lower the learning rate")
            bar.set_description(f"loss {loss * dims * math.log(2):.2f} nats, {loss:.3f} bpd")
        if oc.log_every and (step + 1) % oc.log_every == 0 and run.world.main:
            with run.metrics_path.open("a") as f:
                f.write(json.dumps({"step": step + 1, "train_bits_per_dim": float(bpd)}) + "\n")
        out_of_time = oc.max_minutes is not None and time.monotonic() - run.t0 > 60 * oc.max_minutes
        if oc.max_minutes is not None and run.world.distributed:  # the ranks stop together
            out_of_time = bool(run.world.all_sum(torch.tensor([float(out_of_time)], device=run.device))[0] > 0)
        if (step + 1) % oc.eval_every == 0 or step + 1 == run.steps or out_of_time:
            _validate(run, step + 1, bar)
        every = oc.checkpoint_every or oc.eval_every
        if run.world.main and ((step + 1) % every == 0 or step + 1 == run.steps or out_of_time):
            _save_checkpoint(run.checkpoint_path, step + 1, run.model, run.ema, run.opt, run.sched, run.best, run.rng)
        if out_of_time:
            log.info("wall-clock budget of %.1f min reached at step %d", oc.max_minutes, step + 1)
            break
        if (step + 1) % oc.eval_every == 0 and oc.patience is not None and step + 1 - run.best["step"] >= oc.patience * oc.eval_every:
            log.info("validation likelihood not better for %d evaluations: stopped at step %d", oc.patience, step + 1)
            break
    bar.close()


def _finish(run: _Run) -> dict[str, Any]:
    """The best EMA weights: test and validation bits/dim, the anomaly calibration (records and waveforms),
    the artifact, and (images) a sample grid. Returns the final metrics."""
    cfg, oc, data = run.cfg, run.cfg.train, run.data
    final: DensityModel = copy.deepcopy(run.ema.module)  # type: ignore[arg-type]
    if run.best_state is not None:
        final.load_state_dict(run.best_state)
    final = final.eval()  # evaluation, calibration and the sample grid run on the training device
    test = evaluate(final, data.split("test"), oc.eval_batch, seed=cfg.seed, world=run.world)
    val = evaluate(final, data.split("val"), oc.eval_batch, seed=cfg.seed, world=run.world)
    metrics = {
        "test_bits_per_dim": test["bits_per_dim"],
        "test_nll_nats": test["nll_nats"],
        "val_bits_per_dim": val["bits_per_dim"],
        "bound": test["bound"],
        "eval_seed": cfg.seed,
        "eval_batch": oc.eval_batch,
        "best_step": run.best["step"],
        "steps": run.last_step + 1,
        "skipped_steps": int(run.skipped_steps),
        "micro_batch": min(run.micro, oc.batch_size),
        "train_seconds": round(time.monotonic() - run.t0, 1),
        "parameters": sum(p.numel() for p in final.parameters()),
        "data": cfg.data,
        "world_size": run.world.size,
    }
    if run.initial_model is not None:  # which of the two the artifact holds, and the initial model's validation bits/dim
        metrics["selected"] = run.initial_model if run.best["step"] == 0 else "flow"
        metrics["initial_val_bits_per_dim"] = run.best.get("initial_val_bits_per_dim")
    calibration = None
    if data.spec.kind in ("record", "waveform"):  # every rank scores its share of the calibration's rows
        from ..anomaly.calibration import calibrate
        from ..anomaly.scoring import model_scorer

        metrics["calibration_records"] = len(data.split("val"))
        if run.world.distributed:
            log.info("anomaly calibration: %d records, each rank scoring its share", len(data.split("val")))
        calibration = calibrate(final, data.split("val"), statistic=cfg.anomaly_statistic,
                                train=data.split("train") if data.spec.kind == "record" else None,
                                known=data.known["val"] if data.known else None,
                                measured=data.measured["train"] if data.measured else None,
                                units=data.units["val"] if data.units else None,
                                score=run.world.sharded(model_scorer(final, oc.eval_batch)) if run.world.distributed else None)
    if not run.world.main:  # rank 0 alone writes; the others wait until the artifact is there
        run.world.barrier()
        return metrics
    artifact.save(final, cfg.model.model_dump(), run.out / "artifact", metrics=metrics, calibration=calibration)
    if data.spec.kind == "image":
        sample_grid(final, run.out / "samples.png")
    with run.metrics_path.open("a") as f:
        f.write(json.dumps({"final": metrics}) + "\n")
    run.world.barrier()
    return metrics
