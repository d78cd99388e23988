"""What the literature and a simple model expect of an experiment, from its own control arm (docs/gossip_wins.md).

One peer of n is slowed by a factor f (a straggler). All-reduce steps at the straggler's pace: each of its rounds
waits for the slowest member. Gossip's peers average in groups and do not wait for a peer that is not there: the
n - 1 others keep their own pace. With t a local step's time, H steps per round, T_o gossip's per-round overhead and
c_AR all-reduce's (all measured in the f = 1 arm of the same sweep), the swarms' throughputs are
    gossip:     (n - 1) / (H t + T_o) + 1 / (f H t + T_o)        rounds per second, summed over the peers
    all-reduce: n / (f H t + c_AR)
and their ratio R(f) is what `expected_ratio` returns. It assumes IID data: under a label skew the straggler's
classes are seen 1/f as often, and gossip may plateau below the target while its throughput wins.
"""

from __future__ import annotations

import pandas as pd


def expected_ratio(f: float, peers: int, step_s: float, every_steps: int, gossip_overhead_s: float,
                   allreduce_overhead_s: float) -> float:  # fmt: skip
    """R(f): the swarm throughput of gossip over all-reduce's, one peer of `peers` slowed by `f`."""
    work = every_steps * step_s
    gossip = (peers - 1) / (work + gossip_overhead_s) + 1 / (f * work + gossip_overhead_s)
    allreduce = peers / (f * work + allreduce_overhead_s)
    return gossip / allreduce


def crossover(peers: int, step_s: float, every_steps: int, gossip_overhead_s: float,
              allreduce_overhead_s: float) -> float:  # fmt: skip
    """The straggler factor f* at which R(f*) = 1 (1 when gossip wins already at f = 1; inf when never below 1000)."""
    args = dict(peers=peers, step_s=step_s, every_steps=every_steps, gossip_overhead_s=gossip_overhead_s,
                allreduce_overhead_s=allreduce_overhead_s)  # fmt: skip
    low, high = 1.0, 1000.0
    if expected_ratio(low, **args) >= 1:
        return 1.0
    if expected_ratio(high, **args) < 1:
        return float("inf")
    for _ in range(60):  # R grows with f: bisection
        middle = (low + high) / 2
        low, high = (middle, high) if expected_ratio(middle, **args) < 1 else (low, middle)
    return (low + high) / 2


def round_overhead_s(rows: pd.DataFrame) -> float:
    """The training thread's time per round in a run's rows: its averaging seconds over its rounds (ok or not)."""
    last = rows.sort_values("epoch").groupby(["peer", "restarts"]).tail(1)
    rounds = (last["averaging_rounds_ok"] + last["averaging_rounds_failed"]).sum()
    return float(rows["averaging_seconds"].sum() / rounds) if rounds else 0.0


def step_time_s(rows: pd.DataFrame) -> float:
    """A local step's time in a run's rows: training seconds per step (the rows' steps are cumulative)."""
    steps = rows.sort_values("epoch").groupby("peer")["step"].apply(lambda s: s.iloc[-1] - s.iloc[0] + 1).sum()
    return float(rows["train_s"].sum() / max(steps, 1))
