"""Tiny datasets written in the real on-disk formats, for tests that run the real loaders without internet.

Every image of class c is filled with `class_color(c)`, so a test (or a short training run) can tell from the
pixels which label a loader paired with it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from workers.peer.synthetic import CIFAR10_LABEL_NAMES, class_color, class_images, write_tiny_cifar10  # noqa: F401


def cifar10_checksums(root: str | Path) -> dict[str, Any]:
    """torchvision.datasets.CIFAR10's checksum tables (`train_list`, `test_list`, `meta`) with the md5 of the files
    under `root` in place of the official ones: set them on the class (monkeypatch.setattr) to load tiny files."""
    from torchvision.datasets import CIFAR10

    base = Path(root) / CIFAR10.base_folder

    def md5(name: str) -> str:
        return hashlib.md5((base / name).read_bytes()).hexdigest()

    return {
        "train_list": [[name, md5(name)] for name, _ in CIFAR10.train_list],
        "test_list": [[name, md5(name)] for name, _ in CIFAR10.test_list],
        "meta": {**CIFAR10.meta, "md5": md5(CIFAR10.meta["filename"])},
    }


# --- Tiny ImageNet: the official tiny-imagenet-200/ folder of JPEGs -------------------------------------------------


def tinyimagenet_wnids(n_classes: int) -> list[str]:
    return [f"n{1443537 + 1000 * i:08d}" for i in range(n_classes)]


def write_tiny_tinyimagenet(
    root: str | Path, n_classes: int = 3, per_class: int = 4, n_val: int = 6, seed: int = 0
) -> Path:
    """Write root/tiny-imagenet-200/ in the official layout with 64x64 JPEGs; return root.

    Val labels are random and recorded only in val/val_annotations.txt (as in the release); the first training
    image is grayscale, as a few real ones are.
    """
    root = Path(root)
    base = root / "tiny-imagenet-200"
    rng = np.random.default_rng(seed)
    wnids = tinyimagenet_wnids(n_classes)
    base.mkdir(parents=True, exist_ok=True)
    (base / "wnids.txt").write_text("".join(f"{wnid}\n" for wnid in wnids))
    (base / "words.txt").write_text("".join(f"{wnid}\ttiny class {i}\n" for i, wnid in enumerate(wnids)))
    for label, wnid in enumerate(wnids):
        _write_train_class(base / "train" / wnid, wnid, label, per_class, rng, grayscale_first=label == 0)
    val_labels = rng.integers(0, n_classes, n_val)
    names = [f"val_{i}.JPEG" for i in range(n_val)]
    _write_jpegs(base / "val" / "images", names, val_labels, rng)
    lines = [f"{name}\t{wnids[label]}\t0\t0\t63\t63\n" for name, label in zip(names, val_labels, strict=True)]
    (base / "val" / "val_annotations.txt").write_text("".join(lines))
    _write_jpegs(base / "test" / "images", ["test_0.JPEG"], np.zeros(1, dtype=int), rng)  # unlabelled, unused
    return root


def _write_train_class(
    folder: Path, wnid: str, label: int, count: int, rng: np.random.Generator, grayscale_first: bool
) -> None:
    names = [f"{wnid}_{i}.JPEG" for i in range(count)]
    _write_jpegs(folder / "images", names, np.full(count, label), rng, grayscale_first=grayscale_first)
    (folder / f"{wnid}_boxes.txt").write_text("".join(f"{name}\t0\t0\t63\t63\n" for name in names))


def _write_jpegs(
    folder: Path, names: list[str], labels: np.ndarray, rng: np.random.Generator, grayscale_first: bool = False
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, pixels) in enumerate(zip(names, class_images(labels, 64, rng), strict=True)):
        image = Image.fromarray(pixels)
        if grayscale_first and i == 0:
            image = image.convert("L")
        image.save(folder / name, format="JPEG", quality=95)
