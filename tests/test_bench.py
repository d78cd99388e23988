"""The bench's parts on a small scale: one round of hivemind and of gloo in real processes, and its tables."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from launcher.bench import _gloo_rounds, _hivemind_rounds, markdown, median_round, serialization_seconds


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_one_round_is_timed_for_hivemind_and_gloo_in_processes_of_their_own():
    """With where a hivemind round's time goes: its two phases, its processes' CPU, serialization."""
    gloo = median_round(_gloo_rounds, 2, 1)
    hivemind = median_round(_hivemind_rounds, 2, 1, "float16")
    assert 0 < gloo["seconds"] < 5 and 0 < hivemind["seconds"] < 30
    assert 0 < hivemind["matchmaking_s"] < hivemind["seconds"] and 0 < hivemind["allreduce_s"] < hivemind["seconds"]
    assert hivemind["averager_cpu_s"] > 0 and hivemind["p2pd_cpu_s"] > 0
    assert 0 < serialization_seconds(torch.randn(2**18), "float16") < 1


def test_the_tables_show_each_bench_with_its_columns():
    table = pd.DataFrame([
        dict(bench="G1", what="gossip", model="cifar_cnn", every_steps=10, samples_per_s=480.0, ratio=0.91,
             rounds_ok=6, averaging_seconds=1.5),
        dict(bench="G2", what="1 MB, group of 2", compression="none", seconds=0.14, gloo_s=0.0056, ratio=25.0),
    ])  # fmt: skip
    text = markdown(table, "cpu (2 cores)")
    assert "Measured on cpu (2 cores)" in text and "### G1" in text and "### G2" in text and "### G7" not in text
    assert "| gossip | cifar_cnn | 10 | 480 | 0.91 | 6 | 1.5 |" in text
    assert "| 1 MB, group of 2 | none | 0.14 | 0.0056 | 25 |" in text
