"""The bench's parts on a small scale: a measured swarm run (its training window's machine CPU), one round of hivemind
and of gloo in real processes, the round-cost summary, and its tables."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from launcher.bench import (
    PROCESS_KINDS,
    _gloo_rounds,
    _hivemind_rounds,
    cifar_data,
    cpu_by_kind,
    markdown,
    measured_run,
    median_round,
    round_cost_summary,
    serialization_seconds,
    swarm_scale,
)


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


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_a_measured_run_reads_the_machines_cpu_over_its_training_window(ray_local, tmp_path):
    """The C bench's run: a real 2-peer gossip swarm; its window is found in the launcher's log, the machine was busy
    in it (at most both cores over its wall time), and its rounds and consensus are read from its metrics."""
    run = measured_run(tmp_path, cifar_data(n_train=1000), "gossip", peers=2, every_steps=4, epochs=2)
    print(run)
    assert 0 < run["wall_s"] < 120 and 0 < run["cpu_s"] <= 2 * run["wall_s"] * 1.05
    assert run["rounds_ok"] >= 6 and run["rounds_failed"] == 0 and run["consensus"] < 1e-6
    # where it went, process by process: the peers' actors, their hivemind processes and p2pd daemons all worked
    kinds = {kind: run[f"cpu_s_{kind.replace(' ', '_')}"] for kind in PROCESS_KINDS}
    assert kinds["peer actors"] > 0 and kinds["hivemind processes"] > 0 and kinds["p2pd"] > 0
    assert 0.5 * run["cpu_s"] <= sum(kinds.values()) <= 1.2 * run["cpu_s"], (kinds, run["cpu_s"])


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_the_scale_bench_reads_rounds_and_control_cpu_per_swarm_size(ray_local, tmp_path):
    """G8 on a small scale: 3 peers in one group, then `none` at that size. The rounds all succeed, the swarm ends at
    the consensus where `none` does not, and the control plane (hivemind's processes, p2pd) spent CPU on each round."""
    gossip, none = swarm_scale(tmp_path, points=[(3, 2.0)], epochs=2)
    print(gossip, none, sep="\n")
    assert (gossip["what"], none["what"]) == ("gossip", "none") and gossip["peers"] == none["peers"] == 3
    assert gossip["rounds"] == 6 and gossip["ok_share"] == 1.0 and none["rounds"] == 0
    assert gossip["consensus_vs_none"] < 1e-4 and none["consensus_vs_none"] == 1.0
    assert gossip["control_ms"] > 0 and 0 < gossip["round_s"] < 5
    assert 0 < gossip["cores_busy"] <= 2 * 1.05


def test_cpu_by_kind_counts_what_each_process_spent_in_between():
    before = {1: ("p2pd", 10.0), 2: ("peer actors", 5.0), 3: ("ray", 1.0)}
    after = {1: ("p2pd", 12.5), 2: ("peer actors", 9.0), 4: ("hivemind processes", 0.5)}  # 3 ended, 4 was born
    spent = cpu_by_kind(before, after)
    assert spent == {**dict.fromkeys(PROCESS_KINDS, 0.0), "p2pd": 2.5, "peer actors": 4.0, "hivemind processes": 0.5}


def test_c_is_the_extra_cpu_per_peer_round_over_the_same_repeats_none():
    runs = pd.DataFrame([
        dict(what=what, peers=4, every_steps=10, repeat=repeat, cpu_s=cpu, rounds_ok=ok, rounds_failed=failed,
             consensus=consensus, samples_per_s=speed)
        for what, repeat, cpu, ok, failed, consensus, speed in [
            ("none", 0, 100.0, 0, 0, 0.5, 400.0), ("gossip", 0, 110.0, 380, 20, 1e-9, 360.0),
            ("none", 1, 101.0, 0, 0, 0.5, 420.0), ("gossip", 1, 109.0, 400, 0, 2e-9, 399.0),
            ("none", 2, 103.0, 0, 0, 0.5, 410.0), ("gossip", 2, 115.0, 400, 0, 3e-9, 410.0),
        ]
    ])  # fmt: skip
    (row,) = round_cost_summary(runs).itertuples()
    costs = sorted([1000 * 10 / 400, 1000 * 8 / 400, 1000 * 12 / 400])
    assert (row.c_ms, row.c_min, row.c_max) == pytest.approx((costs[1], costs[0], costs[2]))
    assert row.floor_ms == pytest.approx(1000 * 1.5 / 400)  # median of |101-100|, |103-101|, per peer-round
    assert row.ok_share == pytest.approx(1180 / 1200) and row.consensus == pytest.approx(2e-9)
    assert row.g1_ratio == pytest.approx(0.95)  # median of 360/400, 399/420, 410/410


def test_the_tables_show_each_bench_with_its_columns():
    table = pd.DataFrame([
        dict(bench="C", what="none", peers=4, every_steps=10, repeat=0, cpu_s=100.0, rounds_ok=0, rounds_failed=0,
             consensus=0.5, samples_per_s=400.0),
        dict(bench="C", what="allreduce", peers=4, every_steps=10, repeat=0, cpu_s=104.0, rounds_ok=400,
             rounds_failed=0, consensus=0.0, samples_per_s=380.0),
        dict(bench="G2", what="1 MB, group of 2", compression="none", seconds=0.14, gloo_s=0.0056, ratio=25.0),
    ])  # fmt: skip
    text = markdown(table, "cpu (2 cores)")
    assert "Measured on cpu (2 cores)" in text and "### C" in text and "### G2" in text and "### G7" not in text
    assert "| allreduce | 4 | 10 | 10 |" in text and "| 0.95 |" in text
    assert "| 1 MB, group of 2 | none | 0.14 | 0.0056 | 25 |" in text
