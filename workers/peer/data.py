"""Datasets and the per-peer shard of the training set.

torchvision and PIL are imported inside the loaders that need them, so a digits run never pays for them.
The on-disk layouts, the fast `check_data` and the download live in `workers.peer.datasets`, which imports no torch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from workers.core.config import DataConfig
from workers.core.errors import ConfigError
from workers.peer.datasets import CIFAR10_DIR, TINYIMAGENET_DIR, prepare_data

logger = logging.getLogger(__name__)

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class Splits:
    train: Dataset
    test: Dataset
    num_classes: int
    train_labels: np.ndarray  # labels of `train`, in order, so shards can be drawn without decoding images
    input_shape: tuple[int, int, int]  # (channels, height, width) of one input, for build_model
    partition: str = "iid"  # data.partition and data.dirichlet_alpha: how peer_shard splits `train`
    dirichlet_alpha: float = 0.5


def load_dataset(cfg: DataConfig) -> Splits:
    # The CLI downloads before the peers start; a peer on another machine downloads here (once per machine). A missing
    # or incomplete dataset is a ConfigError that says where to put it, also without the CLI.
    prepare_data(cfg)
    loaders: dict[str, Callable[[DataConfig], Splits]] = {
        "digits": _digits,
        "cifar10": _cifar10,
        "tinyimagenet": _tinyimagenet,
    }
    if cfg.dataset not in loaders:
        raise ValueError(f"data.dataset={cfg.dataset!r} is not supported")
    return replace(loaders[cfg.dataset](cfg), partition=cfg.partition, dirichlet_alpha=cfg.dirichlet_alpha)


def _digits(cfg: DataConfig) -> Splits:
    """scikit-learn's 8x8 digits (1797 images, ships with the package): a fixed, seeded train/test split."""
    pixels, target = digits_arrays()
    images = torch.tensor(pixels / 16.0, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(target, dtype=torch.long)
    order = np.random.default_rng(0).permutation(len(labels))  # the split never depends on the run's seed
    num_test = int(round(len(labels) * cfg.test_fraction))
    test_idx, train_idx = order[:num_test], order[num_test:]
    return Splits(
        train=TensorDataset(images[train_idx], labels[train_idx]),
        test=TensorDataset(images[test_idx], labels[test_idx]),
        num_classes=10,
        train_labels=labels[train_idx].numpy(),
        input_shape=(1, 8, 8),
    )


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The images (1797, 8, 8) and labels of `sklearn.datasets.load_digits`, read from the CSV scikit-learn ships,
    as load_digits reads it, without importing scikit-learn: its import (scipy, pandas) was a second of CPU per peer,
    a third of a peer's start-up on two cores."""
    import gzip
    import importlib.util

    package = Path(importlib.util.find_spec("sklearn").submodule_search_locations[0])  # finds, does not import
    with gzip.open(package / "datasets" / "data" / "digits.csv.gz", "rt") as rows:
        table = np.loadtxt(rows, delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(int)


def _cifar10(cfg: DataConfig) -> Splits:
    """torchvision's CIFAR-10 (the python pickles under root/cifar-10-batches-py/), 50k train / 10k test."""
    root = cfg.root.expanduser()
    dataset = _cifar10_class(cfg.verify_checksums)
    train_tf = image_transform(32, 4, CIFAR10_MEAN, CIFAR10_STD, augment=cfg.augment)
    test_tf = image_transform(32, 4, CIFAR10_MEAN, CIFAR10_STD, augment=False)
    try:
        train = dataset(root, train=True, transform=train_tf)
        test = dataset(root, train=False, transform=test_tf)
    except RuntimeError as err:  # torchvision checks every file's md5 against the official release
        raise ConfigError(
            f"data.root={str(cfg.root)!r}: the files in {root.resolve() / CIFAR10_DIR} are not the official "
            f"CIFAR-10 release (torchvision: {err}); delete them and set `data.download: true`, or set "
            f"`data.verify_checksums: false` if they are a re-packed copy in the same format"
        ) from err
    return Splits(
        train=train,
        test=test,
        num_classes=10,
        train_labels=np.asarray(train.targets, dtype=np.int64),
        input_shape=(3, 32, 32),
    )


def _cifar10_class(verify_checksums: bool) -> type:
    """torchvision's CIFAR10 checks each file's md5 against the official release even with download=False, so a copy
    that was re-packed or converted (same pickles, other bytes), or a test's tiny generated files, cannot load.
    Without verification, the same class with its md5 tables emptied: torchvision then checks only that each file
    exists. A download checks the archive's md5 either way (`workers.datacheck.fetch`)."""
    from torchvision.datasets import CIFAR10

    if verify_checksums:
        return CIFAR10

    class CIFAR10FilesOnly(CIFAR10):
        train_list = [[name, None] for name, _ in CIFAR10.train_list]
        test_list = [[name, None] for name, _ in CIFAR10.test_list]
        meta = {**CIFAR10.meta, "md5": None}

    return CIFAR10FilesOnly


def _tinyimagenet(cfg: DataConfig) -> Splits:
    """Tiny ImageNet (200 classes of 64x64 images; 100k train, the 10k labelled val images as the test set)."""
    root = cfg.root.expanduser()
    base = root / TINYIMAGENET_DIR
    train = TinyImageNet(base, "train", image_transform(64, 8, IMAGENET_MEAN, IMAGENET_STD, augment=cfg.augment))
    test = TinyImageNet(base, "val", image_transform(64, 8, IMAGENET_MEAN, IMAGENET_STD, augment=False))
    return Splits(
        train=train,
        test=test,
        num_classes=len(train.wnids),
        train_labels=train.targets,
        input_shape=(3, 64, 64),
    )


def image_transform(size: int, padding: int, mean, std, augment: bool):
    """PIL image -> normalized tensor; with `augment`, a random padded crop and a random horizontal flip first."""
    from torchvision import transforms as T

    steps = [T.RandomCrop(size, padding=padding), T.RandomHorizontalFlip()] if augment else []
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])


class TinyImageNet(Dataset):
    """The official tiny-imagenet-200 folder: `train/<wnid>/images/*.JPEG`, and `val/images/*.JPEG` labelled by
    `val/val_annotations.txt` (file, wnid, box, tab-separated). Class i is line i of `wnids.txt`."""

    def __init__(self, base: Path, split: str, transform: Callable | None = None):
        self.wnids = (base / "wnids.txt").read_text().split()
        class_of = {wnid: i for i, wnid in enumerate(self.wnids)}
        pairs = _train_samples(base, class_of) if split == "train" else _val_samples(base, class_of)
        self.paths = [path for path, _ in pairs]
        self.targets = np.array([label for _, label in pairs], dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        from PIL import Image

        with Image.open(self.paths[index]) as image:
            image = image.convert("RGB")  # a few Tiny ImageNet images are grayscale
        return (self.transform(image) if self.transform else image), int(self.targets[index])


def _train_samples(base: Path, class_of: dict[str, int]) -> list[tuple[Path, int]]:
    return [
        (path, label)
        for wnid, label in class_of.items()
        for path in sorted((base / "train" / wnid / "images").glob("*.JPEG"))
    ]


def _val_samples(base: Path, class_of: dict[str, int]) -> list[tuple[Path, int]]:
    annotations = base / "val" / "val_annotations.txt"
    pairs = []
    for line in annotations.read_text().splitlines():
        if not line.strip():
            continue
        filename, wnid = line.split("\t")[:2]
        if wnid not in class_of:
            raise ValueError(f"{annotations}: {filename} is labelled {wnid!r}, which is not in wnids.txt")
        pairs.append((base / "val" / "images" / filename, class_of[wnid]))
    return pairs


def partition(labels: np.ndarray, num_peers: int, scheme: str, alpha: float, seed: int) -> list[np.ndarray]:
    """Split sample indices 0..len(labels)-1 among the peers: disjoint, covering, none empty, fixed by `seed`."""
    if len(labels) < num_peers:
        raise ValueError(f"{len(labels)} training samples cannot give each of peers={num_peers} a sample")
    if scheme == "iid":
        return iid_shards(len(labels), num_peers, seed)
    if scheme == "dirichlet":
        return dirichlet_shards(labels, num_peers, alpha, seed)
    if scheme == "skewed":
        return skewed_shards(labels, num_peers, alpha, seed)
    raise ValueError(f"data.partition={scheme!r} is not supported")


def iid_shards(num_samples: int, num_peers: int, seed: int) -> list[np.ndarray]:
    """Disjoint, equal-size (within one) random shards that together cover every sample."""
    order = np.random.default_rng(seed).permutation(num_samples)
    return [np.sort(order[peer::num_peers]) for peer in range(num_peers)]


def dirichlet_shards(labels: np.ndarray, num_peers: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Label skew (Hsu et al., 2019): each class's samples go to the peers in proportions ~ Dirichlet(alpha).

    Small alpha gives each class to few peers (and each peer few classes); large alpha approaches IID.
    """
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_peers)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        shares = rng.dirichlet(np.full(num_peers, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
        for peer, piece in enumerate(np.split(members, cuts)):
            parts[peer].append(piece)
    return _fill_empty([np.sort(np.concatenate(pieces)) for pieces in parts])


def skewed_shards(labels: np.ndarray, num_peers: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Label skew with equal shards: each peer's class mix ~ Dirichlet(alpha) over the classes, every shard the same
    size (within one), so synchronous methods take as many steps per epoch on every peer. A peer draws each sample's
    class from its mix among the classes with samples left (from what is left, in proportion, once its own are gone)."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    pools = [list(rng.permutation(np.flatnonzero(labels == label))) for label in classes]
    shards = []
    for peer in range(num_peers):
        size = len(labels) // num_peers + (peer < len(labels) % num_peers)
        mix, taken = rng.dirichlet(np.full(len(classes), alpha)), []
        for _ in range(size):
            left = np.array([len(pool) for pool in pools], dtype=float)
            weights = mix * (left > 0)
            weights = weights if weights.sum() > 0 else left
            taken.append(pools[rng.choice(len(classes), p=weights / weights.sum())].pop())
        shards.append(np.sort(np.array(taken, dtype=int)))
    return shards


def _fill_empty(shards: list[np.ndarray]) -> list[np.ndarray]:
    """Give each empty shard the last sample of the then-largest shard, so every peer has data to train on."""
    for peer, shard in enumerate(shards):
        if len(shard) == 0:
            donor = max(range(len(shards)), key=lambda p: len(shards[p]))
            shards[peer], shards[donor] = shards[donor][-1:], shards[donor][:-1]
    return shards


def peer_shard(splits: Splits, peer: int, num_peers: int, seed: int) -> Subset:
    shards = partition(splits.train_labels, num_peers, splits.partition, splits.dirichlet_alpha, seed)
    indices = shards[peer]
    logger.info(
        "peer %d: %d training samples from %d classes (partition=%s)",
        peer,
        len(indices),
        len(np.unique(splits.train_labels[indices])),
        splits.partition,
    )
    return Subset(splits.train, indices.tolist())
