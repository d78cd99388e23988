"""The dataset download (before the peers start), with archives of tiny generated datasets in the real formats served
from file:// URLs: the temporary folder and rename, the completeness check, md5, time limit and the CLI's order."""

from __future__ import annotations

import logging
import shutil
import tarfile
from pathlib import Path

import pytest

from tests.conftest import QUICKSTART
from tests.datasets import write_tiny_cifar10, write_tiny_tinyimagenet
from workers.core.config import DataConfig
from workers.core.errors import ConfigError
from workers.peer.data import load_dataset
from workers.peer.datasets import (
    CIFAR10_DIR,
    TINYIMAGENET_DIR,
    Archive,
    check_data,
    install_archive,
    prepare_data,
)


def tinyimagenet_zip(tmp_path: Path) -> Path:
    """A zip of a tiny tiny-imagenet-200/ (3 classes), laid out as the official one."""
    source = write_tiny_tinyimagenet(tmp_path / "source", n_classes=3, per_class=2, n_val=3)
    return Path(shutil.make_archive(str(tmp_path / "tiny-imagenet-200"), "zip", source, TINYIMAGENET_DIR))


def cifar10_tar(tmp_path: Path) -> Path:
    source = write_tiny_cifar10(tmp_path / "source", n_train=50, n_test=20)
    return Path(shutil.make_archive(str(tmp_path / "cifar-10-python"), "gztar", source, CIFAR10_DIR))


def leftovers(root: Path) -> list[str]:
    """Hidden temporary files or folders of a download or extraction."""
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".") and p.name != ".download.lock")


def test_a_download_is_extracted_beside_the_dataset_and_renamed_into_place(tmp_path, caplog):
    archive = tinyimagenet_zip(tmp_path)
    cfg = DataConfig(dataset="tinyimagenet", root=tmp_path / "data", download=True)
    with caplog.at_level(logging.INFO, logger="workers.peer.datasets"):
        prepare_data(cfg, Archive(archive.as_uri(), None, TINYIMAGENET_DIR))
    assert f"downloading {archive.as_uri()}" in caplog.text and "downloaded" in caplog.text
    splits = load_dataset(cfg.model_copy(update={"download": False}))
    assert (len(splits.train), len(splits.test), splits.num_classes) == (6, 3, 3)
    assert leftovers(tmp_path / "data") == [] and archive.exists(), "no temporary files; the source is untouched"


def test_a_complete_copy_is_not_downloaded_again(tmp_path):
    root = write_tiny_tinyimagenet(tmp_path / "data")
    gone = Archive((tmp_path / "nowhere.zip").as_uri(), None, TINYIMAGENET_DIR)  # fetching it would fail
    prepare_data(DataConfig(dataset="tinyimagenet", root=root, download=True), gone)


def test_an_extraction_that_fails_midway_leaves_no_dataset_folder(tmp_path):
    archive = cifar10_tar(tmp_path)
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(archive.read_bytes()[: archive.stat().st_size * 2 // 3])
    with tarfile.open(archive) as whole:
        assert len(whole.getnames()) > 3, "several files: the truncated archive fails after extracting some"
    root = tmp_path / "data"
    root.mkdir()
    with pytest.raises(ConfigError, match="could not extract truncated.tar.gz"):
        install_archive(truncated, root, CIFAR10_DIR, "cifar10")
    assert not (root / CIFAR10_DIR).exists() and leftovers(root) == []
    install_archive(archive, root, CIFAR10_DIR, "cifar10")
    check_data(DataConfig(dataset="cifar10", root=root))


def test_a_half_extracted_tinyimagenet_is_refused_then_set_aside_and_downloaded_again(tmp_path):
    """What an interrupted download of the old code left: the folder, with the classes extracted last missing."""
    root = write_tiny_tinyimagenet(tmp_path / "data", n_classes=3, per_class=2, n_val=3)
    base = root / TINYIMAGENET_DIR
    last_class = (base / "wnids.txt").read_text().split()[-1]
    shutil.rmtree(base / "train" / last_class)
    cfg = DataConfig(dataset="tinyimagenet", root=root)
    with pytest.raises(ConfigError, match=rf"is incomplete: 1 of 3 classes have no images \(e.g. train/{last_class}"):
        check_data(cfg)
    archive = Archive(tinyimagenet_zip(tmp_path).as_uri(), None, TINYIMAGENET_DIR)
    prepare_data(cfg.model_copy(update={"download": True}), archive)
    check_data(cfg)
    (aside,) = root.glob(f"{TINYIMAGENET_DIR}.incomplete-*")
    assert not (aside / "train" / last_class).exists(), "the broken copy is kept aside, not deleted"


def test_missing_validation_images_make_a_tinyimagenet_incomplete(tmp_path):
    root = write_tiny_tinyimagenet(tmp_path, n_val=3)
    (root / TINYIMAGENET_DIR / "val" / "images" / "val_2.JPEG").unlink()
    with pytest.raises(ConfigError, match="1 validation images named in val/val_annotations.txt are missing"):
        check_data(DataConfig(dataset="tinyimagenet", root=root))


def test_a_download_with_the_wrong_md5_is_discarded(tmp_path):
    archive = Archive(tinyimagenet_zip(tmp_path).as_uri(), "0" * 32, TINYIMAGENET_DIR)
    cfg = DataConfig(dataset="tinyimagenet", root=tmp_path / "data", download=True)
    with pytest.raises(ConfigError, match="expected 00000000000000000000000000000000"):
        prepare_data(cfg, archive)
    assert not (tmp_path / "data" / TINYIMAGENET_DIR).exists() and leftovers(tmp_path / "data") == []


def test_a_download_past_its_time_limit_stops_and_leaves_nothing(tmp_path):
    archive = Archive(tinyimagenet_zip(tmp_path).as_uri(), None, TINYIMAGENET_DIR)
    cfg = DataConfig(dataset="tinyimagenet", root=tmp_path / "data", download=True, download_timeout=1e-9)
    with pytest.raises(ConfigError, match=r"data.download_timeout=1e-09: .* was not downloaded in time"):
        prepare_data(cfg, archive)
    assert not (tmp_path / "data" / TINYIMAGENET_DIR).exists() and leftovers(tmp_path / "data") == []


def test_an_unreachable_url_is_a_config_error(tmp_path):
    cfg = DataConfig(dataset="tinyimagenet", root=tmp_path / "data", download=True)
    with pytest.raises(ConfigError, match="could not download"):
        prepare_data(cfg, Archive((tmp_path / "absent.zip").as_uri(), None, TINYIMAGENET_DIR))


def test_the_cli_downloads_before_it_starts_the_run(tmp_path, monkeypatch):
    """`gossip-launch run` with data.download: the data is in place when the run (Ray, the peers) starts."""
    import launcher.driver.controller
    from launcher.cli import main as cli_main
    from workers.peer import datasets as datacheck

    archive = Archive(tinyimagenet_zip(tmp_path).as_uri(), None, TINYIMAGENET_DIR)
    monkeypatch.setitem(datacheck.ARCHIVES, "tinyimagenet", archive)
    root, seen = tmp_path / "data", []

    def run_experiment(cfg, out_dir, address=None):
        seen.append(check_data(cfg.data.model_copy(update={"download": False})) is None)
        return launcher.driver.controller.RunResult(Path(out_dir), 0)

    monkeypatch.setattr(launcher.driver.controller, "run_experiment", run_experiment)
    settings = ["data.dataset=tinyimagenet", f"data.root={root}", "data.download=true", "model.name=resnet50"]
    code = cli_main(["run", str(QUICKSTART), *(f"--set={item}" for item in settings), "--out", str(tmp_path / "out")])
    assert code == 0 and seen == [True]
