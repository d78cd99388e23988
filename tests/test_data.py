"""Datasets (real loaders on tiny files in the real formats), the data check, partitions and models."""

from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from tests.datasets import (
    cifar10_checksums,
    class_color,
    tinyimagenet_wnids,
    write_tiny_cifar10,
    write_tiny_tinyimagenet,
)
from workers.core.config import DataConfig, ModelConfig
from workers.core.errors import ConfigError
from workers.peer.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Splits,
    load_dataset,
    partition,
    peer_shard,
)
from workers.peer.datasets import CIFAR10_URL, TINYIMAGENET_URL, check_data
from workers.peer.models import build_model


@pytest.fixture
def tiny_cifar(tmp_path, monkeypatch):
    """Tiny CIFAR-10 files, with torchvision's md5 table pointed at them (it holds the official release's)."""
    from torchvision.datasets import CIFAR10

    root = write_tiny_cifar10(tmp_path / "data", n_train=50, n_test=20)
    for name, value in cifar10_checksums(root).items():
        monkeypatch.setattr(CIFAR10, name, value)
    return root


def pixel_label(image: torch.Tensor, mean, std) -> int:
    """The class whose colour is nearest to this normalized image's mean colour."""
    rgb = (image.mean(dim=(1, 2)) * torch.tensor(std) + torch.tensor(mean)) * 255
    return int(np.argmin([np.abs(rgb.numpy() - class_color(c)).sum() for c in range(216)]))


# --- check_data ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dataset", "folder", "url"),
    [("cifar10", "cifar-10-batches-py", CIFAR10_URL), ("tinyimagenet", "tiny-imagenet-200", TINYIMAGENET_URL)],
)
def test_check_data_names_field_path_layout_and_remedy(tmp_path, dataset, folder, url):
    cfg = DataConfig(dataset=dataset, root=tmp_path / "nowhere")
    with pytest.raises(ConfigError) as err:
        check_data(cfg)
    message = str(err.value)
    assert "data.root=" in message
    assert str((tmp_path / "nowhere" / folder).resolve()) in message
    assert "expected layout" in message and folder in message
    assert "data.download: true" in message and url in message


def test_check_data_passes_for_digits_downloads_and_present_data(tmp_path):
    check_data(DataConfig(dataset="digits", root=tmp_path / "nowhere"))
    check_data(DataConfig(dataset="cifar10", root=tmp_path / "nowhere", download=True))
    check_data(DataConfig(dataset="cifar10", root=write_tiny_cifar10(tmp_path / "c")))
    check_data(DataConfig(dataset="tinyimagenet", root=write_tiny_tinyimagenet(tmp_path / "t")))


def test_check_data_lists_the_missing_files(tmp_path):
    root = write_tiny_cifar10(tmp_path)
    (root / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(ConfigError, match=r"missing: test_batch\)"):
        check_data(DataConfig(dataset="cifar10", root=root))


def test_datacheck_imports_no_torch():
    code = "import sys, workers.peer.datasets; sys.exit('torch' in sys.modules or 'torchvision' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_cifar10_url_is_torchvisions():
    from torchvision.datasets import CIFAR10

    assert CIFAR10_URL == CIFAR10.url


# --- CIFAR-10 -----------------------------------------------------------------------------------------------------


def test_tiny_cifar10_files_have_the_official_format(tmp_path):
    base = write_tiny_cifar10(tmp_path, n_train=10) / "cifar-10-batches-py"
    with open(base / "data_batch_1", "rb") as f:
        batch = pickle.load(f, encoding="bytes")  # how the CIFAR web page says to read them
    assert set(batch) == {b"batch_label", b"labels", b"data", b"filenames"}
    assert batch[b"data"].dtype == np.uint8 and batch[b"data"].shape == (2, 3072)
    with open(base / "batches.meta", "rb") as f:
        assert pickle.load(f, encoding="latin1")["label_names"][0] == "airplane"


def test_cifar10_loads_labels_images_and_shapes(tiny_cifar):
    splits = load_dataset(DataConfig(dataset="cifar10", root=tiny_cifar, augment=False))
    assert (len(splits.train), len(splits.test), splits.num_classes) == (50, 20, 10)
    assert splits.input_shape == (3, 32, 32)
    written = []
    for i in range(1, 6):
        with open(tiny_cifar / "cifar-10-batches-py" / f"data_batch_{i}", "rb") as f:
            written += pickle.load(f, encoding="bytes")[b"labels"]
    np.testing.assert_array_equal(splits.train_labels, written)
    for dataset in (splits.train, splits.test):
        for image, label in (dataset[i] for i in range(0, len(dataset), 7)):
            assert image.shape == (3, 32, 32) and image.dtype == torch.float32
            assert pixel_label(image, CIFAR10_MEAN, CIFAR10_STD) == label


def test_cifar10_augmentation_keeps_the_shape(tiny_cifar):
    splits = load_dataset(DataConfig(dataset="cifar10", root=tiny_cifar, augment=True))
    images = torch.stack([splits.train[0][0] for _ in range(8)])
    assert images.shape == (8, 3, 32, 32)
    assert not torch.equal(images.min(0).values, images.max(0).values)  # random crops differ


def test_cifar10_with_wrong_checksums_is_a_clear_error(tmp_path):
    root = write_tiny_cifar10(tmp_path)  # torchvision's table still holds the official md5s
    with pytest.raises(ConfigError, match="not the official CIFAR-10 release"):
        load_dataset(DataConfig(dataset="cifar10", root=root))


# --- Tiny ImageNet ------------------------------------------------------------------------------------------------


def test_tinyimagenet_loads_train_by_folder_and_val_by_annotations(tmp_path):
    root = write_tiny_tinyimagenet(tmp_path, n_classes=3, per_class=4, n_val=9)
    splits = load_dataset(DataConfig(dataset="tinyimagenet", root=root, augment=False))
    assert (len(splits.train), len(splits.test), splits.num_classes) == (12, 9, 3)
    assert splits.input_shape == (3, 64, 64)
    np.testing.assert_array_equal(splits.train_labels, np.repeat(np.arange(3), 4))
    wnids = tinyimagenet_wnids(3)
    lines = (root / "tiny-imagenet-200" / "val" / "val_annotations.txt").read_text().splitlines()
    annotated = [wnids.index(line.split("\t")[1]) for line in lines]
    assert len(set(annotated)) > 1, "the writer should give val images several labels"
    np.testing.assert_array_equal(splits.test.targets, annotated)
    for dataset in (splits.train, splits.test):
        for image, label in (dataset[i] for i in range(len(dataset))):  # train[0] is a grayscale JPEG
            assert image.shape == (3, 64, 64)
            assert pixel_label(image, IMAGENET_MEAN, IMAGENET_STD) == label


def test_tinyimagenet_batches_for_training(tmp_path):
    root = write_tiny_tinyimagenet(tmp_path, n_classes=2, per_class=3)
    splits = load_dataset(DataConfig(dataset="tinyimagenet", root=root, augment=True))
    images, labels = next(iter(DataLoader(splits.train, batch_size=6, shuffle=True)))
    assert images.shape == (6, 3, 64, 64) and sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]


def test_tinyimagenet_val_label_outside_wnids_is_an_error(tmp_path):
    root = write_tiny_tinyimagenet(tmp_path)
    annotations = root / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    annotations.write_text(annotations.read_text() + "val_0.JPEG\tn99999999\t0\t0\t63\t63\n")
    with pytest.raises(ValueError, match="n99999999"):
        load_dataset(DataConfig(dataset="tinyimagenet", root=root))


# --- partitions ---------------------------------------------------------------------------------------------------

LABELS = np.repeat(np.arange(10), 500)  # 10 classes x 500 samples


def mean_tv_from_global(labels: np.ndarray, shards: list[np.ndarray]) -> float:
    """Mean over peers of the total-variation distance between the peer's label distribution and the global one."""
    num_classes = labels.max() + 1
    overall = np.bincount(labels, minlength=num_classes) / len(labels)
    peer_dists = [np.bincount(labels[shard], minlength=num_classes) / len(shard) for shard in shards]
    return float(np.mean([0.5 * np.abs(dist - overall).sum() for dist in peer_dists]))


@pytest.mark.parametrize(
    ("scheme", "alpha"), [("iid", 0.5), ("dirichlet", 0.1), ("dirichlet", 100.0), ("skewed", 0.1), ("skewed", 100.0)]
)
def test_partition_is_disjoint_covering_nonempty_and_seeded(scheme, alpha):
    shards = partition(LABELS, 10, scheme, alpha, seed=3)
    assert len(shards) == 10 and all(len(shard) > 0 for shard in shards)
    assert sorted(np.concatenate(shards).tolist()) == list(range(len(LABELS)))
    again = partition(LABELS, 10, scheme, alpha, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(shards, again, strict=True))
    other = partition(LABELS, 10, scheme, alpha, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(shards, other, strict=True))


def test_dirichlet_small_alpha_skews_labels_and_iid_does_not():
    assert mean_tv_from_global(LABELS, partition(LABELS, 10, "dirichlet", 0.1, seed=0)) > 0.4
    assert mean_tv_from_global(LABELS, partition(LABELS, 10, "iid", 0.1, seed=0)) < 0.1
    assert mean_tv_from_global(LABELS, partition(LABELS, 10, "dirichlet", 100.0, seed=0)) < 0.1


def test_skewed_shards_are_equal_in_size_and_skewed_like_dirichlets():
    """The study's partition: every peer as many samples (synchronous methods step together), a strong skew at alpha
    0.1, none at alpha 100."""
    for seed in range(3):
        shards = partition(LABELS[:4999], 8, "skewed", 0.1, seed)
        assert max(len(s) for s in shards) - min(len(s) for s in shards) <= 1
        assert mean_tv_from_global(LABELS[:4999], shards) > 0.4
    assert mean_tv_from_global(LABELS, partition(LABELS, 10, "skewed", 100.0, seed=0)) < 0.1


def test_dirichlet_gives_every_peer_a_sample_even_when_the_draw_does_not():
    labels = np.repeat(np.arange(2), 10)  # 20 samples, 2 classes: tiny alpha leaves most of 8 peers empty
    for seed in range(5):
        shards = partition(labels, 8, "dirichlet", 0.01, seed)
        assert all(len(shard) >= 1 for shard in shards)
        assert sorted(np.concatenate(shards).tolist()) == list(range(20))


def test_partition_needs_a_sample_per_peer():
    with pytest.raises(ValueError, match="peers=4"):
        partition(np.zeros(3, dtype=int), 4, "iid", 0.5, seed=0)


def test_peer_shard_uses_the_configured_partition():
    splits = load_dataset(DataConfig(partition="dirichlet", dirichlet_alpha=0.1))
    assert (splits.partition, splits.dirichlet_alpha) == ("dirichlet", 0.1)
    expected = partition(splits.train_labels, 4, "dirichlet", 0.1, seed=7)
    for peer in range(4):
        assert peer_shard(splits, peer, 4, seed=7).indices == expected[peer].tolist()


# --- models -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "input_shape", "num_classes"),
    [
        ("small_cnn", (1, 8, 8), 10),
        ("small_cnn", (3, 32, 32), 10),
        ("cifar_cnn", (3, 32, 32), 10),
        ("cifar_cnn", (3, 64, 64), 200),
        ("resnet50", (3, 64, 64), 200),
        ("resnet50", (3, 32, 32), 10),
    ],
)
def test_model_forward_gives_one_logit_per_class(name, input_shape, num_classes):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name), num_classes, input_shape)
    assert model(torch.randn(2, *input_shape)).shape == (2, num_classes)


def test_cifar_cnn_is_the_classic_network():
    model = build_model(ModelConfig(name="cifar_cnn"), 10, (3, 32, 32))
    assert sum(p.numel() for p in model.parameters()) == 62006  # the PyTorch CIFAR-10 tutorial's Net


def test_resnet50_is_adapted_to_small_images():
    model = build_model(ModelConfig(name="resnet50"), 200, (3, 64, 64))
    assert (model.conv1.kernel_size, model.conv1.stride) == ((3, 3), (1, 1))
    assert isinstance(model.maxpool, torch.nn.Identity)


def test_cifar_cnn_rejects_images_too_small():
    with pytest.raises(ValueError, match="at least 16x16"):
        build_model(ModelConfig(name="cifar_cnn"), 10, (1, 8, 8))


def test_models_train_on_the_loaders_batches(tiny_cifar, tmp_path):
    tiny = write_tiny_tinyimagenet(tmp_path / "tin", n_classes=2, per_class=2)
    cases = [("cifar_cnn", DataConfig(dataset="cifar10", root=tiny_cifar))]
    cases.append(("resnet50", DataConfig(dataset="tinyimagenet", root=tiny)))
    for name, cfg in cases:
        splits: Splits = load_dataset(cfg)
        images, labels = next(iter(DataLoader(splits.train, batch_size=4)))
        model = build_model(ModelConfig(name=name), splits.num_classes, splits.input_shape)
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        assert torch.isfinite(loss) and model(images).shape == (4, splits.num_classes)


def test_data_config_rejects_bad_values():
    for bad in ({"dirichlet_alpha": 0}, {"num_workers": -1}, {"partition": "shards"}, {"dataset": "mnist"}):
        with pytest.raises(ValueError):
            DataConfig(**bad)
    assert DataConfig().partition == "iid" and DataConfig().augment and not DataConfig().download


def test_data_generate_writes_a_marked_cifar10_once_and_again_for_another_size(tmp_path, caplog):
    from workers.peer.datasets import prepare_data

    cfg = DataConfig(dataset="cifar10", root=tmp_path, generate=500, verify_checksums=False, augment=False)
    prepare_data(cfg)
    base = tmp_path / "cifar-10-batches-py"
    assert "not CIFAR-10" in (base / "GENERATED").read_text()
    splits = load_dataset(cfg)
    assert (len(splits.train), len(splits.test), splits.num_classes) == (500, 50, 10)
    written = (base / "data_batch_1").stat().st_mtime_ns
    prepare_data(cfg)
    assert (base / "data_batch_1").stat().st_mtime_ns == written, "an existing generated set is kept"
    assert "holds GENERATED images" in caplog.text
    prepare_data(cfg.model_copy(update={"generate": 300}))
    assert len(load_dataset(cfg.model_copy(update={"generate": 300})).train) == 300


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"dataset": "digits", "generate": 10}, "data.generate=10 writes CIFAR-10 files"),
        ({"dataset": "cifar10", "generate": 10}, "set data.verify_checksums: false"),
    ],
)
def test_data_generate_needs_cifar10_without_checksums(settings, message):
    from workers.core.config import parse_config

    with pytest.raises(ConfigError, match=message):
        parse_config({"data": settings})


def test_the_bandwidth_study_is_eight_valid_points():
    from launcher.sweep.grammar import load_experiment
    from tests.conftest import ROOT

    sweep = load_experiment(ROOT / "configs/experiments/bandwidth_study.yaml")
    points = {(p.config.emulation.rate_mbit, p.config.gossip.method) for p in sweep.points}
    assert points == {(rate, method) for rate in (5, 50) for method in ("gossip", "diloco", "allreduce", "none")}
    assert all(p.config.data.generate and p.config.optim.optimizer == "adamw" for p in sweep.points)


def test_digits_are_read_as_scikit_learn_reads_them_without_importing_it():
    """The peers read digits' CSV themselves (scikit-learn's import was a third of a peer's start-up): the same
    images and labels as load_digits, and sklearn is not imported (checked in a fresh interpreter)."""
    from sklearn.datasets import load_digits

    from workers.peer.data import digits_arrays

    images, labels = digits_arrays()
    reference = load_digits()
    assert images.shape == (1797, 8, 8)
    np.testing.assert_array_equal(images, reference.images)
    np.testing.assert_array_equal(labels, reference.target)
    probe = ("import sys; from workers.peer.data import load_dataset; from workers.core.config import DataConfig; "
             "s = load_dataset(DataConfig(dataset='digits')); "
             "print(len(s.train) + len(s.test), 'sklearn' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["1797", "False"]
