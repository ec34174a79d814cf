"""Datasets selected by a spec string (``digits``, ``mnist:DIR``, ``cifar10:DIR``, ...)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..spec import DataSpec
from . import images

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Dataset:
    """Arrays for each split plus the spec that describes one example.

    ``known`` (records with gaps, e.g. MIMIC vitals): per split, which cells hold a measurement
    (or one carried forward) rather than a default for a variable never measured; ``None``: all.
    ``measured`` (the same data sets): per split, which cells were measured in that record itself, the
    pattern of features a monitor sends for it; ``None``: all.
    ``grouped``: the splits are by patient (or episode), so records must not move between them.
    ``units``: for grouped data, the number of patients (or episodes) in each split: the independent
    units behind its records (a calibration from 100 patients is worth 100 draws, not 4,800;
    :mod:`models.anomaly.drift`); ``None``: every record is its own unit.
    """

    spec: DataSpec
    splits: dict[str, np.ndarray]
    known: dict[str, np.ndarray] | None = None
    grouped: bool = False
    measured: dict[str, np.ndarray] | None = None
    units: dict[str, int] | None = None

    def split(self, name: str) -> np.ndarray:
        if name not in self.splits:
            raise DataError(f"unknown split {name!r}; choose one of {', '.join(self.splits)}")
        return self.splits[name]

    def with_held_out(self, n: int, seed: int) -> Dataset:
        """This data set with the training and validation records pooled, shuffled by ``seed``, and the first ``n``
        made the validation split (the records held out to calibrate anomaly scores), their masks moved with them.
        The same ``(n, seed)`` on the same data gives the same split: what training held out, recalibration finds."""
        train, val = self.split("train"), self.split("val")
        order = np.random.default_rng(seed).permutation(len(train) + len(val))
        pool = np.concatenate([train, val])[order]

        def moved(masks: dict[str, np.ndarray] | None) -> dict[str, np.ndarray] | None:
            if not masks:
                return masks
            m = np.concatenate([masks["train"], masks["val"]])[order]
            return {**masks, "val": m[:n], "train": m[n:]}

        return Dataset(self.spec, {**self.splits, "val": pool[:n], "train": pool[n:]}, moved(self.known), self.grouped,
                       moved(self.measured))


def _image_dataset(spec: str, splits: dict[str, np.ndarray], levels: int = 256) -> Dataset:
    shape = tuple(int(s) for s in splits["train"].shape[1:])
    return Dataset(DataSpec(kind="image", shape=shape, levels=levels, source=spec), splits)


def load_dataset(spec: str) -> Dataset:
    """Load a dataset from a spec string.

    ``digits`` · ``digits-permuted:SEED`` (one fixed random permutation of all pixels) · ``mnist:DIR`` · ``cifar10:DIR`` · ``imagenet32:DIR`` · ``folder:DIR`` · ``npy:FILE``
    · ``csv:FILE`` · ``waveform:FILE.npy`` · ``mimic-vitals[:DIR|FILE]`` · ``mimic-waveform[:DIR]`` · ``mimic-waveform-minmax[:DIR]``
    (the MIMIC kinds load a generated cohort when no path is given; :mod:`models.data.mimic`).
    """
    kind, _, arg = spec.partition(":")
    if kind == "digits":
        return _image_dataset(spec, images.load_digits_images(), levels=17)
    if kind == "digits-permuted":
        return _image_dataset(spec, images.permute_pixels(images.load_digits_images(), int(arg or 0)), levels=17)
    if not arg and kind in {"mnist", "cifar10", "imagenet32", "folder", "npy"}:
        raise DataError(f"data spec {spec!r} needs a path, e.g. {kind}:/path/to/data")
    path = Path(arg).expanduser()
    if kind == "mnist":
        return _image_dataset(spec, images.load_mnist(path))
    if kind == "cifar10":
        return _image_dataset(spec, images.load_cifar10(path))
    if kind == "imagenet32":
        return _image_dataset(spec, images.load_imagenet32(path))
    if kind == "folder":
        return _image_dataset(spec, images.load_folder(path))
    if kind == "npy":
        return _image_dataset(spec, images.split_fixed(images.load_npy(path)))
    from . import records  # record formats live with the records module

    if kind in records.LOADERS:
        return records.LOADERS[kind](spec, arg)
    known = "digits, mnist:DIR, cifar10:DIR, imagenet32:DIR, folder:DIR, npy:FILE, " + ", ".join(
        f"{k}:PATH" for k in records.LOADERS
    )
    raise DataError(f"unknown data spec {spec!r}; known: {known}")


__all__ = ["Dataset", "SPLITS", "load_dataset"]
