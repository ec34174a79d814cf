"""Image datasets in their standard on-disk formats, as ``uint8`` arrays ``(N, C, H, W)``.

Every loader returns ``{"train": ..., "val": ..., "test": ...}``. Formats with an official
test set keep it as ``test`` and hold out the last 5% of the training set as ``val``; the
others split deterministically 90/5/5 after a fixed shuffle.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from pathlib import Path

import numpy as np

from ..errors import DataError

Splits = dict[str, np.ndarray]


def _need_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{path}: data directory not found (expected {what})")
    return path


def _holdout(train: np.ndarray, test: np.ndarray, frac: float = 0.05) -> Splits:
    n_val = max(1, int(len(train) * frac))
    return {"train": train[:-n_val], "val": train[-n_val:], "test": test}


def split_fixed(data: np.ndarray, seed: int = 0, val: float = 0.05, test: float = 0.05) -> Splits:
    """Shuffle with a fixed seed and split into train/val/test."""
    order = np.random.default_rng(seed).permutation(len(data))
    n_val, n_test = max(1, int(len(data) * val)), max(1, int(len(data) * test))
    if len(data) < n_val + n_test + 1:
        raise DataError(f"need at least {n_val + n_test + 1} examples to split, got {len(data)}")
    data = data[order]
    return {"test": data[:n_test], "val": data[n_test : n_test + n_val], "train": data[n_test + n_val :]}


# --- scikit-learn digits -------------------------------------------------------------------

def load_digits_images() -> Splits:
    """scikit-learn's 1,797 handwritten digits, 8×8×1 with 17 levels (0..16); split 70/15/15."""
    from sklearn.datasets import load_digits

    images = load_digits().images.astype(np.uint8)[:, None]  # (N, 1, 8, 8)
    return split_fixed(images, seed=0, val=0.15, test=0.15)


def permute_pixels(splits: Splits, seed: int) -> Splits:
    """Apply one fixed random permutation (from ``seed``) of all C·H·W positions to every image of every split."""
    shape = splits["train"].shape[1:]
    perm = np.random.default_rng(seed).permutation(int(np.prod(shape)))
    return {k: v.reshape(len(v), -1)[:, perm].reshape(len(v), *shape) for k, v in splits.items()}


# --- MNIST IDX -----------------------------------------------------------------------------

def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) of unsigned bytes."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read IDX file ({e.strerror})") from None
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: not a valid gzip file ({e})") from None
    if len(raw) < 4:
        raise DataError(f"{path}: truncated IDX file (no header)")
    zero, dtype_code, ndim = raw[0] << 8 | raw[1], raw[2], raw[3]
    if zero != 0 or dtype_code != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file (magic {raw[:4].hex()})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX file (header of {ndim} dimensions incomplete)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise DataError(f"{path}: truncated IDX file: dimensions {dims} need {expected} bytes, found {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find(directory: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    raise DataError(f"{directory / stem}: missing MNIST file (looked for {stem} and {stem}.gz)")


def load_mnist(directory: Path) -> Splits:
    """MNIST (or Fashion-MNIST) from the four standard IDX files, 28×28×1, 256 levels."""
    directory = _need_dir(directory, "train-images-idx3-ubyte[.gz] and t10k-images-idx3-ubyte[.gz]")
    train = read_idx(_find(directory, "train-images-idx3-ubyte"))
    test = read_idx(_find(directory, "t10k-images-idx3-ubyte"))
    for arr, name in ((train, "train"), (test, "t10k")):
        if arr.ndim != 3:
            raise DataError(f"{directory}: {name} images must have 3 dimensions (N, H, W), got {arr.shape}")
    return _holdout(train[:, None], test[:, None])


# --- CIFAR-10 python batches ---------------------------------------------------------------

class _RestrictedUnpickler(pickle.Unpickler):
    """Admits only what CIFAR-10 batches contain: dicts, lists, bytes, str, numbers and numpy arrays."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle API
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"forbidden global {module}.{name}")


def read_cifar_batch(path: Path) -> np.ndarray:
    """One CIFAR-10 python batch file -> ``(N, 3, 32, 32)`` uint8."""
    try:
        with path.open("rb") as f:
            batch = _RestrictedUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise DataError(f"{path}: missing CIFAR-10 batch file") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise DataError(f"{path}: not a CIFAR-10 python batch ({e})") from None
    data = batch.get(b"data", batch.get("data")) if isinstance(batch, dict) else None
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: expected a dict with 'data' of shape (N, 3072)")
    return data.astype(np.uint8).reshape(-1, 3, 32, 32)


def load_cifar10(directory: Path) -> Splits:
    """CIFAR-10 from ``data_batch_1..5`` and ``test_batch`` (the python version), 32×32×3."""
    directory = _need_dir(directory, "data_batch_1..5 and test_batch")
    train = np.concatenate([read_cifar_batch(directory / f"data_batch_{i}") for i in range(1, 6)])
    return _holdout(train, read_cifar_batch(directory / "test_batch"))


# --- ImageNet32 npz ------------------------------------------------------------------------

def read_imagenet_npz(path: Path, side: int = 32) -> np.ndarray:
    """One downsampled-ImageNet npz batch (key ``data``, ``(N, 3·side²)``) -> ``(N, 3, side, side)``."""
    try:
        with np.load(path, allow_pickle=False) as f:
            data = f["data"]
    except FileNotFoundError:
        raise DataError(f"{path}: missing ImageNet npz file") from None
    except (KeyError, ValueError, OSError) as e:
        raise DataError(f"{path}: not an ImageNet{side} npz batch with key 'data' ({e})") from None
    if data.ndim != 2 or data.shape[1] != 3 * side * side:
        raise DataError(f"{path}: 'data' must have shape (N, {3 * side * side}), got {data.shape}")
    return data.astype(np.uint8).reshape(-1, 3, side, side)


def load_imagenet32(directory: Path) -> Splits:
    """ImageNet32 from ``train_data_batch_*.npz`` and ``val_data.npz``."""
    directory = _need_dir(directory, "train_data_batch_*.npz and val_data.npz")
    files = sorted(directory.glob("train_data_batch_*.npz"))
    if not files:
        raise DataError(f"{directory}: no train_data_batch_*.npz files")
    train = np.concatenate([read_imagenet_npz(p) for p in files])
    return _holdout(train, read_imagenet_npz(directory / "val_data.npz"))


# --- PNG/JPEG folders and NPY --------------------------------------------------------------

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


def read_image(data: bytes | Path, source: str = "image") -> np.ndarray:
    """Decode one PNG/JPEG to ``(C, H, W)`` uint8 (grayscale C=1, else RGB C=3)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
            img = img.convert("L") if img.mode in ("1", "L", "LA", "I", "I;16") else img.convert("RGB")
            arr = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        # Pillow reports some corrupt chunks as SyntaxError/ValueError, oversized images as a bomb.
        raise DataError(f"{source}: not a readable PNG/JPEG image ({e})") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def load_folder(directory: Path) -> Splits:
    """Every PNG/JPEG under a folder (recursively); all must share one size."""
    directory = _need_dir(directory, "PNG/JPEG files")
    paths = sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise DataError(f"{directory}: no PNG/JPEG files found")
    images = [read_image(p, str(p)) for p in paths]
    shape = images[0].shape
    for p, img in zip(paths, images):
        if img.shape != shape:
            raise DataError(f"{p}: image shape {img.shape} differs from {shape} of {paths[0].name}")
    return split_fixed(np.stack(images))


def read_npy(path: Path) -> np.ndarray:
    """Any ``.npy`` array (never unpickled); a missing or malformed file is a ``DataError``."""
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{path}: NPY file not found") from None
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: not a valid .npy array ({e})") from None


def load_npy(path: Path) -> np.ndarray:
    """An ``.npy`` array of images ``(N, H, W)``, ``(N, C, H, W)`` or ``(N, H, W, C)`` with C ∈ {1, 3}."""
    arr = read_npy(path)
    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim == 4 and arr.shape[1] not in (1, 3) and arr.shape[3] in (1, 3):
        arr = arr.transpose(0, 3, 1, 2)
    if arr.ndim != 4:
        raise DataError(f"{path}: expected images (N, H, W), (N, C, H, W) or (N, H, W, C), got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0 or arr.max() > 255:
        raise DataError(f"{path}: expected integer pixel values in 0..255")
    return np.ascontiguousarray(arr.astype(np.uint8))
