"""The two workload configs (CIFAR-10 gossip, Tiny ImageNet ResNet-50), run for real with 2 peers on tiny generated
data; and the pieces they rely on: loading re-packed CIFAR-10 files, and the bf16/channels-last training step."""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from launcher.driver.controller import run_experiment
from launcher.results.summary import read_metrics
from tests.conftest import ROOT
from tests.datasets import write_tiny_cifar10, write_tiny_tinyimagenet
from workers.averaging.base import NoAveraging
from workers.averaging.gossip import GossipAveraging
from workers.core.config import DataConfig, load_config
from workers.core.errors import ConfigError
from workers.peer.checkpoint import checkpoint_path
from workers.peer.data import load_dataset
from workers.peer.peer import Peer
from workers.peer.train import train

EXPERIMENTS = ROOT / "configs" / "experiments"
ON_CPU = ["peers=2", "resources.num_gpus=0", "resources.num_cpus=1", "optim.epochs=1", "gossip.matchmaking_time=1.5"]


# --- CIFAR-10 files that are not the official release -------------------------------------------------------------


def test_generated_cifar10_loads_without_checksums_and_is_refused_with_them(tmp_path):
    root = write_tiny_cifar10(tmp_path, n_train=50, n_test=20)
    splits = load_dataset(DataConfig(dataset="cifar10", root=root, verify_checksums=False))
    assert (len(splits.train), len(splits.test), splits.num_classes) == (50, 20, 10)
    with pytest.raises(ConfigError, match="verify_checksums: false"):
        load_dataset(DataConfig(dataset="cifar10", root=root))


def test_without_checksums_a_missing_file_is_still_an_error(tmp_path):
    from torchvision.datasets import CIFAR10

    root = write_tiny_cifar10(tmp_path)
    (root / CIFAR10.base_folder / "data_batch_3").unlink()
    with pytest.raises(ConfigError, match="data_batch_3"):  # check_data, before torchvision
        load_dataset(DataConfig(dataset="cifar10", root=root, verify_checksums=False))


# --- the GPU options' code path, on CPU ----------------------------------------------------------------------------


def test_bf16_autocast_and_channels_last_train_and_evaluate(tmp_path):
    """On CPU the peer turns both off; forced on, the same loop runs them (torch has CPU bf16 autocast)."""
    threads = torch.get_num_threads()
    root = write_tiny_cifar10(tmp_path, n_train=40, n_test=10)
    cfg = load_config(EXPERIMENTS / "cifar10_gossip.yaml", [*ON_CPU, "gossip.method=none", f"data.root={root}",
                      "data.verify_checksums=false", "data.num_workers=0", "optim.amp=true",
                      "model.channels_last=true"])  # fmt: skip
    try:
        peer = Peer(cfg, 0, "amp", checkpoint_dir=tmp_path / "ckpt")
        assert not peer.setup.amp and not peer.setup.channels_last, "CUDA-only options are off on CPU"
        peer.setup.amp = peer.setup.channels_last = True
        peer.setup.model.to(memory_format=torch.channels_last)
        (report,) = list(train(peer.setup, NoAveraging(), threading.Event()))
    finally:
        torch.set_num_threads(threads)
    assert math.isfinite(report.row.train_loss) and math.isfinite(report.row.test_loss)
    assert peer.setup.model.features[0].weight.dtype == torch.float32, "autocast leaves the parameters in fp32"


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_gossip_with_the_gpu_options_forced_on_cpu_averages(tmp_path, torch_threads, dhts):
    """The GPU path of a workload (bf16 autocast, a channels_last model) with real gossip: two peers' training loops
    in this process, no Ray, on the CPU with both options forced on as on a GPU. A channels_last model's rounds all
    failed before hivemind was given contiguous copies (tests/test_averaging.py has the details)."""
    root = write_tiny_cifar10(tmp_path / "data", n_train=32, n_test=8)
    cfg = load_config(EXPERIMENTS / "cifar10_gossip.yaml", [*ON_CPU, f"data.root={root}", "data.verify_checksums=false",
                      "data.num_workers=0", "data.batch_size=8", "gossip.every_steps=epoch"])  # fmt: skip
    setups = [Peer(cfg, i, "gpu-path").setup for i in range(2)]  # the peers' setups; hivemind is started below
    for setup in setups:
        setup.amp = setup.channels_last = True
        setup.model.to(memory_format=torch.channels_last)
    pairs = zip(setups, dhts(2), strict=True)
    averagings = [GossipAveraging(setup.model, dht, cfg.gossip, prefix="gpu-path") for setup, dht in pairs]
    try:
        with ThreadPoolExecutor(2) as pool:
            reports = list(pool.map(lambda s, a: list(train(s, a, threading.Event())), setups, averagings))
    finally:
        for averaging in averagings:
            averaging.shutdown()
    assert [r.row.averaging_rounds_ok for (r,) in reports] == [1, 1] and [
        r.row.averaging_group_size for (r,) in reports
    ] == [2, 2]
    first, second = (setup.model for setup in setups)
    assert first.features[0].weight.is_contiguous(memory_format=torch.channels_last), "the GPU layout was used"
    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        torch.testing.assert_close(a, b)  # an epoch-end round of the whole swarm with alpha 1: one model


# --- the workload configs, for real --------------------------------------------------------------------------------


def run_workload(tmp_path, name: str, *overrides: str):
    cfg = load_config(EXPERIMENTS / f"{name}.yaml", [*ON_CPU, f"data.root={tmp_path / 'data'}", *overrides])
    result = run_experiment(cfg, tmp_path / "runs")
    return cfg, result, read_metrics(result.run_dir)


def assert_ran_and_averaged(cfg, result, metrics) -> None:
    assert result.exit_code == 0
    assert sorted(metrics.peer) == [0, 1] and (metrics.epoch == 1).all()
    assert metrics.train_loss.notna().all() and metrics.test_acc.between(0, 1).all()
    assert (metrics.averaging_rounds_ok >= 1).all(), "the peers gossiped"
    for peer in range(cfg.peers):
        assert checkpoint_path(result.run_dir, peer, "final").is_file()


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_cifar10_gossip_config_runs(ray_local, tmp_path):
    write_tiny_cifar10(tmp_path / "data", n_train=48, n_test=16)
    cfg, result, metrics = run_workload(
        tmp_path, "cifar10_gossip", "data.verify_checksums=false", "data.batch_size=8", "gossip.every_steps=3"
    )
    assert (cfg.model.name, cfg.optim.schedule, cfg.data.num_workers) == ("cifar_cnn", "cosine", 2)
    assert_ran_and_averaged(cfg, result, metrics)
    assert (metrics.samples_seen == 24).all()


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_tinyimagenet_resnet50_config_runs(ray_local, tmp_path):
    write_tiny_tinyimagenet(tmp_path / "data", n_classes=3, per_class=2, n_val=2)
    cfg, result, metrics = run_workload(
        tmp_path, "tinyimagenet_resnet50", "optim.warmup_epochs=0", "data.batch_size=3", "data.num_workers=1",
        "gossip.every_steps=epoch",
    )  # fmt: skip
    # no amp or channels_last here: the peers turn both off on a CPU (their path runs in the test above)
    assert cfg.model.name == "resnet50" and cfg.resources.num_gpus == 0
    assert_ran_and_averaged(cfg, result, metrics)
    assert (metrics.samples_seen == 3).all()
