"""Data-parallel training under real ``torchrun`` processes (gloo, 2 ranks, loopback only): the same losses, weights
and test bits/dim as one process; exact resumption, also onto another world size; a rank killed with SIGKILL
restarts the group, which resumes from the last checkpoint and writes one artifact that loads and scores."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from .server import children, free_port

TINY = {
    "data": "digits",
    "device": "cpu",
    "model": {"name": "glow", "levels": 2, "steps": 2, "hidden": 16},
    "train": {"steps": 20, "batch_size": 32, "eval_every": 10, "init_batch": 64, "ema": 0.9, "log_every": 1, "micro_batch": 8},
    "seed": 0,
}
ENV = {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONUNBUFFERED": "1"}


def config(tmp: Path, **train: object) -> Path:
    cfg = {**TINY, "train": {**TINY["train"], **train}}
    path = tmp / f"tiny-{abs(hash(json.dumps(cfg, sort_keys=True)))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def launcher(ranks: int, restarts: int = 0) -> list[str]:
    """One process, or ``torchrun`` with ``ranks`` ranks on a c10d rendezvous at a loopback port."""
    if ranks == 1:
        return [sys.executable, "-m", "models.cli"]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=test", f"--max-restarts={restarts}", "-m", "models.cli"]


def train(ranks: int, cfg: Path, out: Path, *extra: str, restarts: int = 0, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([*launcher(ranks, restarts), "train", str(cfg), "--out", str(out), *extra], env={**os.environ, **ENV},
                       capture_output=True, text=True, timeout=600)
    if check:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def losses(out: Path) -> dict[int, float]:
    """The training loss logged at each step (the last record of a step, for a run that went back to a checkpoint)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train_bits_per_dim"] for r in rows if "train_bits_per_dim" in r}


def final(out: Path) -> dict:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"final"' in line][-1]["final"]


def test_two_ranks_train_as_one_process(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    train(1, cfg, tmp_path / "one")
    r = train(2, cfg, tmp_path / "two")
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(1, 21))
    # Step 1's loss is the data-dependent initialisation's (made on each rank's share, the moments summed): the same init.
    assert abs(two[1] - one[1]) <= 1e-6 * abs(one[1]), (one[1], two[1])
    for step in one:
        assert abs(two[step] - one[step]) <= 1e-4 * abs(one[step]), (step, one[step], two[step])
    w1, w2 = load_file(tmp_path / "one/artifact/weights.safetensors"), load_file(tmp_path / "two/artifact/weights.safetensors")
    assert w1.keys() == w2.keys()
    for k in w1:
        np.testing.assert_allclose(w2[k], w1[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert abs(final(tmp_path / "two")["test_bits_per_dim"] - final(tmp_path / "one")["test_bits_per_dim"]) <= 0.01
    assert final(tmp_path / "two")["world_size"] == 2
    assert "[rank 1]" in r.stderr and "[rank 0]" in r.stderr  # logs say the rank


def test_a_global_batch_that_does_not_divide_is_an_error(tmp_path: Path) -> None:
    r = train(2, config(tmp_path, batch_size=33), tmp_path / "run", check=False)
    assert r.returncode != 0
    assert "batch_size 33 does not divide by the 2 ranks" in r.stdout + r.stderr


def test_stopped_and_resumed_gives_the_losses_of_an_uninterrupted_run(tmp_path: Path) -> None:
    cfg = config(tmp_path, checkpoint_every=5)
    train(1, cfg, tmp_path / "whole")
    train(1, cfg, tmp_path / "split", "--max-steps", "10")
    train(1, cfg, tmp_path / "split", "--resume")
    whole, split = losses(tmp_path / "whole"), losses(tmp_path / "split")
    assert split == whole  # exactly, in one process
    train(2, cfg, tmp_path / "grown", "--max-steps", "10")  # stopped at 2 ranks, resumed in 1 process
    train(1, cfg, tmp_path / "grown", "--resume")
    grown = losses(tmp_path / "grown")
    assert sorted(grown) == sorted(whole)
    for step in whole:
        assert abs(grown[step] - whole[step]) <= 1e-4 * abs(whole[step]), step


def test_a_killed_rank_restarts_the_group_which_resumes_and_writes_one_artifact(tmp_path: Path) -> None:
    cfg = config(tmp_path, steps=300, eval_every=100, checkpoint_every=20, micro_batch=32)
    out = tmp_path / "run"
    proc = subprocess.Popen([*launcher(2, restarts=1), "train", str(cfg), "--out", str(out)], env={**os.environ, **ENV},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed: list[int] = []

    def kill_a_rank() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            started = (out / "checkpoint.pt").exists() and (out / "metrics.jsonl").exists()
            if started and len(losses(out)) >= 60:  # past the first checkpoints (every 20 steps)
                ranks = [pid for pid, cmd in children(proc.pid) if "models.cli" in cmd]  # torchrun's agent spawns the ranks
                if ranks:
                    os.kill(ranks[-1], signal.SIGKILL)
                    killed.append(ranks[-1])
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_a_rank)
    killer.start()
    try:
        log, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        log, _ = proc.communicate()
        raise AssertionError(f"the job did not finish; killed {killed}:\n{log[-6000:]}") from None
    killer.join()
    assert killed, "no rank was found to kill"
    assert proc.returncode == 0, log[-4000:]
    assert "resumed from step" in log
    steps = losses(out)
    assert sorted(steps) == list(range(1, 301))  # every step trained, those after the checkpoint twice
    assert final(out)["steps"] == 300 and final(out)["world_size"] == 2
    assert sum(1 for line in (out / "metrics.jsonl").read_text().splitlines() if '"final"' in line) == 1  # one artifact, by rank 0
    from models.artifacts import store

    model = store.load(out / "artifact")
    x = model.spec.random_examples(4, seed=0).astype(np.float32)
    import torch

    with torch.inference_mode():
        assert torch.isfinite(model.log_prob(torch.from_numpy(x), seed=0)).all()


@pytest.mark.parametrize("bad", ["0", "-1"])
def test_checkpoint_every_is_validated(bad: str, tmp_path: Path) -> None:
    from models.training.loop import TrainConfig

    with pytest.raises(Exception, match="checkpoint_every"):
        TrainConfig.model_validate({**TINY, "train": {**TINY["train"], "checkpoint_every": int(bad)}})


class _ThreadRanks:
    """``size`` ranks as threads of this process: ``reduce`` sums a tensor over them, as ``all_reduce`` does."""

    def __init__(self, size: int) -> None:
        self.size, self.barrier, self.parts = size, threading.Barrier(size), {}

    def reducer(self, rank: int):  # noqa: ANN201
        def reduce(t):  # noqa: ANN001, ANN202
            self.parts[rank] = t.clone()
            self.barrier.wait()
            total = sum(self.parts[r] for r in range(self.size))
            self.barrier.wait()  # every rank has read every part before the next reduction overwrites them
            t.copy_(total)
            return t
        return reduce


@pytest.mark.parametrize("model_cfg", [
    {"name": "glow", "levels": 2, "steps": 2, "hidden": 16},
    {"name": "flowpp", "filters": 8, "blocks": 1, "components": 3, "heads": 2, "dropout": 0.0, "dequant_couplings": 1,
     "dequant_filters": 8, "dequant_blocks": 1, "context_channels": 4, "context_blocks": 1},
], ids=["glow", "flowpp"])
def test_initialisation_on_each_ranks_part_with_summed_moments_equals_one_process(model_cfg: dict) -> None:
    """ActNorm, Flow++'s Norm and its data-initialised convolutions, each rank on its part of the init batch with the
    moments summed over the ranks, set the parameters one process sets from the whole batch."""
    import copy

    import torch

    from models.architectures import build, parse_config
    from models.data import load_dataset
    from models.flows import data_init
    from models.flows.base import reducible_init

    data = load_dataset("digits")
    torch.manual_seed(0)
    fresh = build(parse_config(model_cfg), data.spec)
    assert reducible_init(fresh)
    x = torch.from_numpy(data.split("train")[:48]).float()
    noise = fresh.noise(len(x))
    one = copy.deepcopy(fresh)
    with data_init(one), torch.no_grad():
        one.log_prob(x, noise)
    ranks, models = _ThreadRanks(3), [copy.deepcopy(fresh) for _ in range(3)]

    def run(rank: int) -> None:
        part = slice(rank * 16, (rank + 1) * 16)
        with data_init(models[rank], ranks.reducer(rank)), torch.no_grad():
            models[rank].log_prob(x[part], noise[part])

    threads = [threading.Thread(target=run, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    want = one.state_dict()
    keys = [k for k in want if want[k].is_floating_point()]
    flat = torch.cat([want[k].double().flatten() for k in keys])
    with torch.no_grad():
        loss = one.log_prob(x, noise).double().mean()
    for m in models:
        got = m.state_dict()
        diff = torch.cat([(got[k].double() - want[k].double()).flatten() for k in keys])
        assert diff.norm() <= 1e-6 * flat.norm(), (diff.norm() / flat.norm()).item()  # the init, relative: ≤ 1e-6
        assert diff.abs().max() <= 1e-5  # and no parameter off by more than float32 rounding of the sums
        with torch.no_grad():
            assert abs(m.log_prob(x, noise).double().mean() - loss) <= 1e-6 * abs(loss)
    assert sum(1 for k in want if k.endswith("initialized")) >= 4  # the data-initialised layers were there to compare


def test_a_tabular_flow_initialises_on_the_whole_batch_on_every_rank() -> None:
    """The Yeo-Johnson fit and the cross-validated whitening are not sums of moments: such a model is not reducible,
    and asking for a summed initialisation is an error rather than a different model."""
    import torch

    from models.architectures import build, parse_config
    from models.flows import data_init
    from models.flows.base import reducible_init
    from models.spec import DataSpec

    model = build(parse_config({"name": "tabular", "steps": 1, "hidden": 8}), DataSpec(kind="record", shape=(3,), feature_names=["a", "b", "c"]))
    assert not reducible_init(model)
    with pytest.raises(ValueError, match="whole batch"), data_init(model, lambda t: t):
        pass
    with data_init(model), torch.no_grad():
        model.log_prob(torch.randn(64, 3))
    assert all(bool(m.initialized) for m in model.modules() if isinstance(getattr(m, "initialized", None), torch.Tensor))


def test_two_ranks_calibrate_records_as_one_process(tmp_path: Path) -> None:
    """A record model's anomaly calibration is scored on every rank's share of the calibration records and gathered:
    the calibration stored equals one process's (the vector flow, whose init sums moments over ranks)."""
    from models.artifacts.manifest import read_manifest

    rng = np.random.default_rng(3)
    rows = rng.standard_normal((240, 3)) @ np.array([[1.0, 0.5, 0.0], [0.0, 1.0, 0.3], [0.0, 0.0, 1.0]]) + [60, 120, 37]
    csv = tmp_path / "records.csv"
    csv.write_text("hr,sbp,temp\n" + "\n".join(",".join(f"{v:.3f}" for v in r) for r in rows) + "\n")
    cfg = {**TINY, "data": f"csv:{csv}", "model": {"name": "vector", "steps": 2, "hidden": 8},
           "train": {**TINY["train"], "steps": 10, "eval_every": 5}}
    path = tmp_path / "records.yaml"
    path.write_text(yaml.safe_dump(cfg))
    train(1, path, tmp_path / "one")
    r = train(2, path, tmp_path / "two")
    assert any("[rank 1]" in line and "each rank scoring its share" in line for line in r.stderr.splitlines())
    one, two = (read_manifest(tmp_path / run / "artifact").calibration for run in ("one", "two"))
    assert one.n == two.n >= 50 and one.proposal is not None and two.proposal is not None
    np.testing.assert_allclose(two.scores, one.scores, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(two.conditional_scores or [], one.conditional_scores or [], rtol=1e-5, atol=1e-5)
    assert final(tmp_path / "two")["world_size"] == 2
