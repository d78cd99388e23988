"""A golden tiny run: a seeded 2-peer digits run whose per-epoch losses are committed (tests/assets/, written by the
code before the redesign of issue #21). A change that should not alter what a run computes (a refactor, a move)
must reproduce them. The run is deterministic on CPU (two runs agreed to the last digit); the band allows only for
the last digits a different summation order could change."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from launcher.driver.controller import run_experiment
from tests.conftest import quick_config

GOLDEN = Path(__file__).parent / "assets" / "golden_losses.csv"
BAND = 1e-4  # absolute, on losses of 0.1-2.3


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_a_seeded_tiny_run_reproduces_its_committed_losses(ray_local, tmp_path):
    result = run_experiment(quick_config("peers=2", "optim.epochs=5", "seed=7"), tmp_path)
    assert result.exit_code == 0
    got = pd.read_csv(result.run_dir / "metrics.csv").sort_values(["epoch", "peer"]).reset_index(drop=True)
    want = pd.read_csv(GOLDEN)
    assert got[["epoch", "peer"]].equals(want[["epoch", "peer"]])
    for column in ("train_loss", "test_loss", "test_acc"):
        assert (got[column] - want[column]).abs().max() <= BAND, f"{column}:\n{got[column]}\n{want[column]}"
