"""Loaders for the standard formats, on small files written here."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.data import load_dataset
from models.data.images import read_cifar_batch, read_idx
from models.errors import DataError


def write_idx(path: Path, arr: np.ndarray, gz: bool = False) -> None:
    raw = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def test_digits_spec_and_fixed_split() -> None:
    a, b = load_dataset("digits"), load_dataset("digits")
    assert a.spec.shape == (1, 8, 8) and a.spec.levels == 17
    assert sum(len(v) for v in a.splits.values()) == 1797
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(a.split(split), b.split(split))
    assert a.split("train").max() == 16 and a.split("train").min() == 0


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx(tmp_path: Path, gz: bool) -> None:
    rng = np.random.default_rng(0)
    train, test = rng.integers(0, 256, (40, 28, 28)), rng.integers(0, 256, (10, 28, 28))
    sfx = ".gz" if gz else ""
    write_idx(tmp_path / f"train-images-idx3-ubyte{sfx}", train, gz)
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{sfx}", test, gz)
    ds = load_dataset(f"mnist:{tmp_path}")
    assert ds.spec.shape == (1, 28, 28) and ds.spec.levels == 256
    np.testing.assert_array_equal(ds.split("test")[:, 0], test)
    np.testing.assert_array_equal(np.concatenate([ds.split("train"), ds.split("val")])[:, 0], train)


def test_truncated_idx_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "train-images-idx3-ubyte"
    write_idx(path, np.zeros((4, 28, 28)))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated IDX file"):
        read_idx(path)


def test_missing_mnist_dir() -> None:
    with pytest.raises(DataError, match="data directory not found"):
        load_dataset("mnist:/definitely/not/here")


def _cifar_batch(path: Path, n: int, seed: int) -> np.ndarray:
    data = np.random.default_rng(seed).integers(0, 256, (n, 3072)).astype(np.uint8)
    with path.open("wb") as f:
        pickle.dump({b"data": data, b"labels": [0] * n, b"batch_label": b"x"}, f)
    return data


def test_cifar10_batches(tmp_path: Path) -> None:
    parts = [_cifar_batch(tmp_path / f"data_batch_{i}", 20, i) for i in range(1, 6)]
    test = _cifar_batch(tmp_path / "test_batch", 10, 9)
    ds = load_dataset(f"cifar10:{tmp_path}")
    assert ds.spec.shape == (3, 32, 32)
    np.testing.assert_array_equal(ds.split("test"), test.reshape(-1, 3, 32, 32))
    assert len(ds.split("train")) + len(ds.split("val")) == sum(len(p) for p in parts)


class _Evil:
    def __reduce__(self):  # noqa: ANN204
        return (print, ("pwned",))


def test_cifar_unpickler_refuses_other_globals(tmp_path: Path) -> None:
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": _Evil()}))
    with pytest.raises(DataError, match="forbidden global"):
        read_cifar_batch(path)


def test_imagenet32_npz(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for i in (1, 2):
        np.savez(tmp_path / f"train_data_batch_{i}.npz", data=rng.integers(0, 256, (30, 3072)).astype(np.uint8), labels=np.ones(30))
    val = rng.integers(0, 256, (8, 3072)).astype(np.uint8)
    np.savez(tmp_path / "val_data.npz", data=val, labels=np.ones(8))
    ds = load_dataset(f"imagenet32:{tmp_path}")
    np.testing.assert_array_equal(ds.split("test"), val.reshape(-1, 3, 32, 32))
    assert len(ds.split("train")) + len(ds.split("val")) == 60


def test_png_folder_and_mismatched_size(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = rng.integers(0, 256, (40, 8, 8)).astype(np.uint8)
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(tmp_path / f"{i:03d}.png")
    ds = load_dataset(f"folder:{tmp_path}")
    assert ds.spec.shape == (1, 8, 8)
    got = np.concatenate([ds.split(s) for s in ("train", "val", "test")])[:, 0]
    assert sorted(map(bytes, got)) == sorted(map(bytes, arrays))
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "odd.png")
    with pytest.raises(DataError, match="differs"):
        load_dataset(f"folder:{tmp_path}")


def test_npy_channel_last(tmp_path: Path) -> None:
    arr = np.random.default_rng(0).integers(0, 256, (50, 4, 4, 3)).astype(np.uint8)
    np.save(tmp_path / "x.npy", arr)
    ds = load_dataset(f"npy:{tmp_path / 'x.npy'}")
    assert ds.spec.shape == (3, 4, 4)
    np.save(tmp_path / "bad.npy", np.full((5, 4, 4), 300))
    with pytest.raises(DataError, match="0..255"):
        load_dataset(f"npy:{tmp_path / 'bad.npy'}")


def test_unknown_spec() -> None:
    with pytest.raises(DataError, match="unknown data spec"):
        load_dataset("parquet:/x")


def test_waveform_npy_and_errors(tmp_path: Path) -> None:
    arr = np.random.default_rng(0).standard_normal((40, 2, 64)).astype(np.float32)
    np.save(tmp_path / "w.npy", arr)
    ds = load_dataset(f"waveform:{tmp_path / 'w.npy'}")
    assert ds.spec.kind == "waveform" and ds.spec.shape == (2, 64) and ds.spec.feature_names == ["ch0", "ch1"]
    assert sum(len(v) for v in ds.splits.values()) == 40
    bad = arr.copy()
    bad[3, 1, 5] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(DataError, match="NaN"):
        load_dataset(f"waveform:{tmp_path / 'nan.npy'}")
    (tmp_path / "junk.npy").write_bytes(b"not an npy file")
    with pytest.raises(DataError, match="not a valid .npy"):
        load_dataset(f"waveform:{tmp_path / 'junk.npy'}")


def test_permuted_digits_is_one_fixed_permutation() -> None:
    plain, perm = load_dataset("digits"), load_dataset("digits-permuted:0")
    order = np.random.default_rng(0).permutation(64)
    assert not np.array_equal(order, np.arange(64))
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(perm.split(split).reshape(-1, 64), plain.split(split).reshape(-1, 64)[:, order])
    assert not np.array_equal(load_dataset("digits-permuted:1").split("test"), perm.split("test"))
