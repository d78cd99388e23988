"""Datasets and the per-peer shard of the training set."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from workers.config import DataConfig


@dataclass
class Splits:
    train: Dataset
    test: Dataset
    num_classes: int
    train_labels: np.ndarray  # labels of `train`, in order, so shards can be drawn without decoding images


def load_dataset(cfg: DataConfig) -> Splits:
    if cfg.dataset == "digits":
        return _digits(cfg)
    raise ValueError(f"data.dataset={cfg.dataset!r} is not supported")


def _digits(cfg: DataConfig) -> Splits:
    """scikit-learn's 8x8 digits (1797 images, ships with the package): a fixed, seeded train/test split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = np.random.default_rng(0).permutation(len(labels))  # the split never depends on the run's seed
    num_test = int(round(len(labels) * cfg.test_fraction))
    test_idx, train_idx = order[:num_test], order[num_test:]
    return Splits(
        train=TensorDataset(images[train_idx], labels[train_idx]),
        test=TensorDataset(images[test_idx], labels[test_idx]),
        num_classes=10,
        train_labels=labels[train_idx].numpy(),
    )


def iid_shards(num_samples: int, num_peers: int, seed: int) -> list[np.ndarray]:
    """Disjoint, equal-size (within one) random shards that together cover every sample."""
    order = np.random.default_rng(seed).permutation(num_samples)
    return [np.sort(order[peer::num_peers]) for peer in range(num_peers)]


def peer_shard(splits: Splits, peer: int, num_peers: int, seed: int) -> Subset:
    return Subset(splits.train, iid_shards(len(splits.train_labels), num_peers, seed)[peer].tolist())
