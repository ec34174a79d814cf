"""Data-parallel training on ``torch.distributed``, as ``torchrun`` launches it.

``flowserve train CONFIG`` runs unchanged under ``torchrun --nproc-per-node N`` (and across machines
with ``--nnodes M --rdzv-backend c10d --rdzv-endpoint HOST:PORT``). torchrun sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``; :func:`from_env` joins the process group: NCCL on CUDA, one
process per device (``cuda:LOCAL_RANK``), gloo on the CPU. Without them it is one process, as before.

What each rank does (:mod:`models.training.loop`):

* the same data, the same seed, so the same global batch of every step, drawn by ``(seed, step)``
  alone; rank ``r`` of ``W`` trains on rows ``r·B/W … (r+1)·B/W − 1`` of it. ``batch_size`` stays the
  global batch, and one that does not divide by ``W`` is an error;
* the data-dependent initialisation on the whole global init batch, before the model is wrapped,
  so every rank's initial parameters equal the single process's. Each rank computes it in full
  rather than on its share with all-reduced statistics: ActNorm's and Flow++'s moments could be
  all-reduced, but the tabular flow's marginals (medians, Yeo-Johnson λ by maximum likelihood) and
  its cross-validated shrinkage covariance cannot be assembled from per-rank sums. One forward
  pass on the init batch (128–256 examples) is what it costs each rank;
* gradients averaged by ``DistributedDataParallel`` (micro-batches accumulate under ``no_sync``);
  the step is skipped on every rank when any rank's loss or gradient is not finite;
* validation and test bits/dim over its share of the batches, summed across ranks;
* rank 0 alone writes checkpoints, metrics, sample grids and the artifact, and shows progress.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

Score = Callable[[np.ndarray, np.ndarray | None], np.ndarray]  # log p (nats) of rows, given their noise

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    """This process's place in the job: ``rank`` of ``size`` (1: no process group)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def device(self, setting: torch.device) -> torch.device:
        """The device of this rank: ``cuda:LOCAL_RANK`` when training on CUDA, else the setting."""
        if self.distributed and setting.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return setting

    def share(self, rows: int) -> slice:
        """This rank's part of ``rows`` rows: ``rows // size`` of them, give or take one."""
        return slice(self.rank * rows // self.size, (self.rank + 1) * rows // self.size)

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over the ranks (in place; unchanged in one process)."""
        if self.distributed:
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    def min(self, value: int, device: torch.device) -> int:
        """The smallest ``value`` over the ranks (``value`` in one process)."""
        if not self.distributed:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def gather_rows(self, part: np.ndarray) -> np.ndarray:
        """Every rank's ``part`` (rows first), concatenated in rank order, on every rank (``part`` in one process)."""
        if not self.distributed:
            return part
        parts: list = [None] * self.size
        dist.all_gather_object(parts, part)
        return np.concatenate(parts)

    def sharded(self, score: Score) -> Score:
        """``score(rows, noise)`` with each rank scoring its share of the rows and every rank getting all the results,
        in order. Every rank must call it with the same rows (the anomaly calibration does: its work is the same on
        every rank but for the scoring)."""
        if not self.distributed:
            return score

        def run(rows: np.ndarray, noise: np.ndarray | None) -> np.ndarray:
            part = self.share(len(rows))
            return self.gather_rows(score(rows[part], None if noise is None else noise[part]))

        return run

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def from_env(device: torch.device) -> World:
    """Join the process group torchrun describes in the environment, or one process without it."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    world = World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(world.local_rank)
        timeout = datetime.timedelta(minutes=10)
        # The store torchrun's agent keeps outlives a restart of the group; under a prefix of this attempt, the new
        # ranks never read the addresses the dead ones left there (gloo would try to connect to them).
        agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), size,
                              is_master=not agent_store and world.rank == 0, timeout=timeout)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(backend, store=dist.PrefixStore(f"flowserve/attempt-{attempt}", store), rank=world.rank,
                                world_size=size, timeout=timeout)
        _say_the_rank(world.rank)
        log.info("rank %d of %d (%s)", world.rank, world.size, backend)
    return world


def _say_the_rank(rank: int) -> None:
    """Every log line of this process starts with its rank."""
    make = logging.getLogRecordFactory()

    def factory(*args, **kwargs) -> logging.LogRecord:  # noqa: ANN002, ANN003
        record = make(*args, **kwargs)
        record.msg = f"[rank {rank}] {record.msg}"
        return record

    logging.setLogRecordFactory(factory)


def restarted() -> bool:
    """Whether torchrun restarted this group after a failure (``--max-restarts``): training then resumes."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def leave(world: World) -> None:
    """Leave the process group at the end of training."""
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
