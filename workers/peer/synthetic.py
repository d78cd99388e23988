"""Data in the real on-disk formats, generated: for the bench (`gossip-launch bench`, no download needed) and the
tests, which run the real loaders on it. Every image of class c is filled with `class_color(c)` plus a little
noise, so a loader's pairing of images and labels can be checked from the pixels, and a model learns the classes.
"""

from __future__ import annotations

import io
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np

CIFAR10_LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def class_color(label: int) -> tuple[int, int, int]:
    """A distinct RGB colour for each of up to 216 classes (class 0 is gray, so a grayscale image can be class 0)."""
    return tuple(20 + 40 * digit for digit in (label % 6, label // 6 % 6, label // 36 % 6))


def class_images(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """N x size x size x 3 uint8: each image its class colour plus a little noise."""
    colors = np.array([class_color(int(label)) for label in labels], dtype=np.int16)
    noise = rng.integers(-4, 5, size=(len(labels), size, size, 3))
    return np.clip(colors[:, None, None, :] + noise, 0, 255).astype(np.uint8)


# --- CIFAR-10: the "python version", pickles written by Python 2 (protocol 2, keys are py2 `str`) ---------------


class _Py2Str(bytes):
    """A Python 2 `str`: loads as `str` with encoding="latin1" (torchvision) and as bytes with encoding="bytes"."""


class _Py2Pickler(pickle._Pickler):
    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj: _Py2Str) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[_Py2Str] = _save_py2_str


def _py2(value: Any) -> Any:
    """Turn the str keys and values of a batch dict into py2 strs, as in the official files."""
    if isinstance(value, str):
        return _Py2Str(value.encode("latin1"))
    if isinstance(value, dict):
        return {_py2(k): _py2(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_py2(v) for v in value]
    return value


def _write_py2_pickle(path: Path, obj: dict) -> None:
    buffer = io.BytesIO()
    _Py2Pickler(buffer, protocol=2).dump(_py2(obj))
    path.write_bytes(buffer.getvalue())


def _cifar_batch(name: str, labels: np.ndarray, rng: np.random.Generator) -> dict:
    images = class_images(labels, 32, rng)  # N x 32 x 32 x 3 -> rows of 1024 red, 1024 green, 1024 blue bytes
    return {
        "batch_label": name,
        "labels": [int(label) for label in labels],
        "data": images.transpose(0, 3, 1, 2).reshape(len(labels), 3072),
        "filenames": [f"tiny_{name.split()[0]}_{i}.png" for i in range(len(labels))],
    }


def write_tiny_cifar10(root: str | Path, n_train: int = 50, n_test: int = 20, seed: int = 0) -> Path:
    """Write root/cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta) with random labels; return root.

    torchvision's CIFAR10 checks every file's md5 against the official release even with download=False, so these
    files load only with those checksums replaced: see `cifar10_checksums`.
    """
    root = Path(root)
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    train_labels = rng.integers(0, 10, n_train)
    for i, labels in enumerate(np.array_split(train_labels, 5), start=1):
        _write_py2_pickle(base / f"data_batch_{i}", _cifar_batch(f"training batch {i} of 5", labels, rng))
    _write_py2_pickle(base / "test_batch", _cifar_batch("testing batch 1 of 1", rng.integers(0, 10, n_test), rng))
    meta = {"num_cases_per_batch": len(np.array_split(train_labels, 5)[0]), "label_names": CIFAR10_LABEL_NAMES}
    _write_py2_pickle(base / "batches.meta", {**meta, "num_vis": 3072})
    return root
