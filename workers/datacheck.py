"""Where each dataset lives under `data.root`, and a fast check that it is there.

This module imports only the config (pydantic; no torch, no torchvision), so the CLI can call `check_data` right after
loading the config and before Ray starts: a missing dataset is then one clear error, not N failed peers.
`workers.data` takes its folder names, URLs and checksums from here.
"""

from __future__ import annotations

from workers.config import ConfigError, DataConfig

CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"  # the one torchvision downloads

TINYIMAGENET_DIR = "tiny-imagenet-200"
TINYIMAGENET_FILES = ("wnids.txt", "train", "val/images", "val/val_annotations.txt")
TINYIMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINYIMAGENET_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"

_LAYOUTS = {
    "cifar10": (
        "CIFAR-10",
        CIFAR10_DIR,
        CIFAR10_FILES,
        CIFAR10_URL,
        f"{CIFAR10_DIR}/{{data_batch_1..data_batch_5, test_batch, batches.meta}} (the python pickle version)",
    ),
    "tinyimagenet": (
        "Tiny ImageNet",
        TINYIMAGENET_DIR,
        TINYIMAGENET_FILES,
        TINYIMAGENET_URL,
        f"{TINYIMAGENET_DIR}/{{wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG, val/val_annotations.txt}}",
    ),
}


def check_data(cfg: DataConfig) -> None:
    """Raise ConfigError if `cfg.dataset` is not under `cfg.root` and will not be downloaded.

    Checks that the expected files exist (no checksums, no decoding), so it takes milliseconds.
    """
    if cfg.dataset not in _LAYOUTS or cfg.download:
        return  # digits ships with scikit-learn; a download is checked by the loader itself
    title, folder, files, url, layout = _LAYOUTS[cfg.dataset]
    base = cfg.root.expanduser().resolve() / folder
    missing = [name for name in files if not (base / name).exists()]
    if not missing:
        return
    raise ConfigError(
        f"data.root={str(cfg.root)!r}: {title} not found in {base} (missing: {', '.join(missing)}).\n"
        f"  expected layout under data.root: {layout}\n"
        f"  to get it: set `data.download: true` (or `--set data.download=true`) on a machine that is online, "
        f"or download {url} and extract it into {base.parent}"
    )
