"""Where each dataset lives under `data.root`, a check that it is there and complete, and its download.

This module imports only the config (pydantic; no torch, no torchvision), so the CLI can call `prepare_data` right
after loading the config and before Ray starts: a missing dataset is then one clear error, not N failed peers, and a
download runs once, with its own progress log and time limit, not inside the peers' start-up time limit.
`workers.peer.data` takes its folder names from here.

A download is extracted into a temporary folder beside the dataset's and renamed into place only once complete, so
an interrupted one never leaves a half-filled dataset folder behind; a folder left so by an older version is
recognized (`incomplete`), set aside, and downloaded again.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from workers.core.config import DataConfig
from workers.core.errors import ConfigError

logger = logging.getLogger(__name__)

CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"  # the one torchvision downloads
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"  # torchvision's tgz_md5

TINYIMAGENET_DIR = "tiny-imagenet-200"
TINYIMAGENET_FILES = ("wnids.txt", "train", "val/images", "val/val_annotations.txt")
TINYIMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINYIMAGENET_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
# The official release: 200 classes of 500 training images, 10000 validation images. A tree of that many classes with
# other counts is a truncated extraction; other trees (e.g. the tests' tiny ones) are checked for consistency only.
TINYIMAGENET_COUNTS = {"classes": 200, "per_class": 500, "val": 10_000}

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


@dataclass(frozen=True)
class Archive:
    url: str
    md5: str | None  # of the archive; None: not checked
    folder: str  # the dataset's folder inside the archive, installed as data.root/<folder>


ARCHIVES = {
    "cifar10": Archive(CIFAR10_URL, CIFAR10_MD5, CIFAR10_DIR),
    "tinyimagenet": Archive(TINYIMAGENET_URL, TINYIMAGENET_MD5, TINYIMAGENET_DIR),
}
DOWNLOAD_LOG_EVERY_S = 10.0


def check_data(cfg: DataConfig) -> None:
    """Raise ConfigError if `cfg.dataset` is not under `cfg.root`, whole, and will not be downloaded.

    Checks which files exist and, for Tiny ImageNet, counts them (no checksums, no decoding): well under a second.
    """
    if not cfg.download:
        check_files(cfg)


def prepare_data(cfg: DataConfig, archive: Archive | None = None) -> None:
    """With `data.download`, fetch the dataset into `data.root` unless a complete copy is there (once per machine: peers
    sharing it wait for each other's download); then check it. `archive`: where from (default: the official one)."""
    if cfg.download and cfg.dataset in ARCHIVES:
        ensure_downloaded(cfg, archive or ARCHIVES[cfg.dataset])
    if cfg.generate:
        generate_if_missing(cfg)
    check_files(cfg)


def generate_if_missing(cfg: DataConfig) -> None:
    """`data.generate`: a generated CIFAR-10 (class-coloured images, workers/peer/synthetic.py) where no set is; said
    loudly, and marked by a GENERATED file, so that nobody mistakes its accuracy for CIFAR-10's."""
    from workers.peer.synthetic import write_tiny_cifar10  # numpy: only when asked for

    base = cfg.root.expanduser().resolve() / "cifar-10-batches-py"
    marker, note = base / "GENERATED", f"{cfg.generate} generated training images, not CIFAR-10\n"
    other_size = marker.exists() and marker.read_text() != note  # generated before with another data.generate
    if not (base / "test_batch").exists() or other_size:
        write_tiny_cifar10(cfg.root.expanduser(), n_train=cfg.generate, n_test=max(cfg.generate // 10, 10))
        marker.write_text(note)
    if (base / "GENERATED").exists():
        logger.warning("data: %s holds GENERATED images, not CIFAR-10 (data.generate)", base)


def check_files(cfg: DataConfig) -> None:
    if cfg.dataset not in _LAYOUTS:
        return  # digits ships with scikit-learn
    title, folder, files, url, layout = _LAYOUTS[cfg.dataset]
    base = cfg.root.expanduser().resolve() / folder
    missing = [name for name in files if not (base / name).exists()]
    if not missing and not (reason := incomplete(cfg.dataset, base)):
        return
    found = f"not found in {base} (missing: {', '.join(missing)})" if missing else f"in {base} is incomplete: {reason}"
    then = "" if missing else f" (a download sets {base.name} aside first; by hand, delete it first)"
    raise ConfigError(
        f"data.root={str(cfg.root)!r}: {title} {found}.\n"
        f"  expected layout under data.root: {layout}\n"
        f"  to get it: set `data.download: true` (or `--set data.download=true`) on a machine that is online, "
        f"or download {url} and extract it into {base.parent}{then}"
    )


def incomplete(dataset: str, base: Path) -> str | None:
    """Why the dataset folder `base` (its files present) is not whole; None when it is."""
    return _tinyimagenet_incomplete(base) if dataset == "tinyimagenet" else None


def _tinyimagenet_incomplete(base: Path) -> str | None:
    """An interrupted extraction leaves classes without images, validation images that val_annotations.txt names
    but that are missing, or (official release) fewer files than it has."""
    wnids = (base / "wnids.txt").read_text().split()
    counts = {wnid: _count(base / "train" / wnid / "images", ".JPEG") for wnid in wnids}
    if empty := [wnid for wnid, count in counts.items() if count == 0]:
        return f"{len(empty)} of {len(wnids)} classes have no images (e.g. train/{empty[0]}/images/)"
    annotated = [line.split("\t")[0] for line in (base / "val" / "val_annotations.txt").read_text().splitlines()]
    if absent := [name for name in annotated if name and not (base / "val" / "images" / name).is_file()]:
        return f"{len(absent)} validation images named in val/val_annotations.txt are missing (e.g. {absent[0]})"
    official = TINYIMAGENET_COUNTS
    if len(wnids) == official["classes"]:
        train, val = sum(counts.values()), _count(base / "val" / "images", ".JPEG")
        if (train, val) != (official["classes"] * official["per_class"], official["val"]):
            return f"{train} training and {val} validation images, the release has 100000 and 10000"
    return None


def _count(folder: Path, suffix: str) -> int:
    if not folder.is_dir():
        return 0
    with os.scandir(folder) as entries:
        return sum(entry.name.endswith(suffix) for entry in entries)


def ensure_downloaded(cfg: DataConfig, archive: Archive) -> None:
    """Download and install `archive` into data.root unless a complete copy is there; under a lock, so processes on
    one machine (the CLI, peers) download it once."""
    root = cfg.root.expanduser().resolve()
    with download_lock(root):
        base = root / archive.folder
        if _problem(cfg.dataset, base) is None:
            return
        _set_aside(base)
        for stale in root.glob(f".{archive.folder}.extracting-*"):  # an extraction that was killed
            shutil.rmtree(stale, ignore_errors=True)
        path = fetch(archive, root, cfg.download_timeout)
        try:
            install_archive(path, root, archive.folder, cfg.dataset)
        finally:
            path.unlink()


def _problem(dataset: str, base: Path) -> str | None:
    """What is wrong with the dataset folder `base`: missing files, or what `incomplete` finds; None: it is whole."""
    missing = [name for name in _LAYOUTS[dataset][2] if not (base / name).exists()]
    return f"missing: {', '.join(missing)}" if missing else incomplete(dataset, base)


def _set_aside(base: Path) -> None:
    """A dataset folder that is there but not whole (an interrupted download of an older version) is renamed, not
    deleted: it may be someone's own copy."""
    if base.exists():
        aside = base.with_name(f"{base.name}.incomplete-{datetime.now():%Y%m%d-%H%M%S}")
        logger.warning("data: %s is incomplete; moved to %s, downloading it again", base, aside)
        base.rename(aside)


@contextlib.contextmanager
def download_lock(root: Path):
    """Processes that share a machine and `data.root` download one at a time; the rest then find the files."""
    import fcntl

    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".download.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def fetch(archive: Archive, folder: Path, timeout_s: float) -> Path:
    """`archive.url` into `folder` (through a temporary file, renamed once whole and its md5 checked), logging its
    progress; ConfigError when it fails or takes longer than `timeout_s`."""
    target = folder / Path(urllib.parse.urlparse(archive.url).path).name
    partial = target.with_name(f".{target.name}.partial")
    logger.info("data: downloading %s into %s (data.download_timeout=%g s)", archive.url, folder, timeout_s)
    try:
        digest = _stream(archive.url, partial, timeout_s)
        if archive.md5 is not None and digest != archive.md5:
            raise ConfigError(f"data.download: {archive.url} has md5 {digest}, expected {archive.md5}; try again")
        os.replace(partial, target)
    except OSError as err:  # urllib's URLError included
        raise ConfigError(f"data.download: could not download {archive.url}: {err}") from err
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
    return target


def _stream(url: str, path: Path, timeout_s: float) -> str:
    """Copy `url` to `path` within `timeout_s` seconds, logging progress every DOWNLOAD_LOG_EVERY_S; its md5."""
    deadline, md5, done = time.monotonic() + timeout_s, hashlib.md5(), 0
    with urllib.request.urlopen(url, timeout=min(timeout_s, 60.0)) as response, path.open("wb") as out:
        total, logged = int(response.headers.get("Content-Length") or 0), time.monotonic()
        while chunk := response.read(1 << 20):
            out.write(chunk)
            md5.update(chunk)
            done += len(chunk)
            if time.monotonic() > deadline:
                raise ConfigError(f"data.download_timeout={timeout_s:g}: {url} was not downloaded in time "
                                  f"({_megabytes(done, total)}); raise it, or download the file by hand")  # fmt: skip
            if time.monotonic() - logged >= DOWNLOAD_LOG_EVERY_S:
                logger.info("data: %s", _megabytes(done, total))
                logged = time.monotonic()
    logger.info("data: downloaded %s", _megabytes(done, total))
    return md5.hexdigest()


def _megabytes(done: int, total: int) -> str:
    return f"{done / 1e6:.1f} of {total / 1e6:.1f} MB" if total else f"{done / 1e6:.1f} MB"


def install_archive(path: Path, root: Path, folder: str, dataset: str) -> Path:
    """Extract the archive at `path` into a temporary folder in `root`, check the dataset folder in it, and rename that
    to `root/folder`: an interrupted extraction leaves only the temporary folder (the next download removes it)."""
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{folder}.extracting-"))
    try:
        logger.info("data: extracting %s", path.name)
        _extract(path, staging)
        if problem := _problem(dataset, staging / folder):
            raise ConfigError(f"data.download: {path.name} does not hold a whole {folder}/ ({problem})")
        os.replace(staging / folder, root / folder)
    except (OSError, EOFError, zipfile.BadZipFile, tarfile.TarError) as err:
        raise ConfigError(f"data.download: could not extract {path.name} into {root}: {err!r}") from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root / folder


def _extract(path: Path, dest: Path) -> None:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            archive.extractall(dest)
    else:
        with tarfile.open(path) as archive:
            archive.extractall(dest, filter="data")  # no absolute paths, no links out of `dest`
