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

from launcher.results.summary import round_totals


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
    totals = round_totals(rows)
    rounds = (totals["rounds_ok"] + totals["rounds_failed"]).sum()
    return float(rows["averaging_seconds"].sum() / rounds) if rounds else 0.0


def step_time_s(rows: pd.DataFrame) -> float:
    """A local step's time in a run's rows: training seconds per step. A row's `step` is the peer's cumulative count,
    so the rows after each peer's first cover exactly (first step, last step]."""
    seconds = steps = 0.0
    for _, peer in rows.sort_values("epoch").groupby("peer"):
        if len(peer) > 1:
            seconds += peer["train_s"].iloc[1:].sum()
            steps += peer["step"].iloc[-1] - peer["step"].iloc[0]
        else:
            seconds, steps = seconds + peer["train_s"].sum(), steps + peer["step"].iloc[0]
    return float(seconds / max(steps, 1))


def slow_factors(scenario: object) -> list[float]:
    """The `slow` factors of a run's scenario (its config column: the scenario list's text)."""
    import re

    text = str(scenario)
    return [float(x) for x in re.findall(r"""factor['"]?:\s*([0-9.]+)""", text)] if "slow" in text else []


def straggler_factor(scenario: object) -> float:
    """The `slow` factor of a run's scenario, 1 without one."""
    return max(slow_factors(scenario), default=1.0)


def straggler_table(df: pd.DataFrame, table: pd.DataFrame, method: str = "gossip") -> pd.DataFrame:
    """E1's prediction next to its measurement, per straggler factor f: R(f) from the f = 1 arms' own step time and
    round overheads, the measured swarm throughput ratio of `method` over all-reduce, and the ratio of their swarms'
    times to target (all-reduce's over the method's: above 1 = the method is faster). `df`: load_runs' rows of
    the sweep, `table`: compare_runs(df, target_acc)'s."""
    df = df.assign(f=df["scenario"].map(straggler_factor) if "scenario" in df else 1.0)
    table = table.assign(f=table["scenario"].map(straggler_factor) if "scenario" in table else 1.0)
    control = df[df["f"] == 1.0]
    gossip_rows = control[control["gossip.method"] == method]
    allreduce_rows = control[control["gossip.method"] == "allreduce"]
    if gossip_rows.empty or allreduce_rows.empty:
        raise ValueError(f"the f = 1 arm needs a {method} run and an allreduce run")
    model = dict(peers=int(gossip_rows["peer"].nunique()), step_s=step_time_s(gossip_rows),
                 every_steps=int(gossip_rows["gossip.every_steps"].iloc[0]),
                 gossip_overhead_s=round_overhead_s(gossip_rows),
                 allreduce_overhead_s=round_overhead_s(allreduce_rows))  # fmt: skip
    out = []
    for f, rows in table.groupby("f"):
        ours, theirs = rows[rows["method"] == method], rows[rows["method"] == "allreduce"]
        if ours.empty or theirs.empty:
            continue
        time_column = "swarm_to_target_s" if "swarm_to_target_s" in rows else "time_to_target_s"
        out.append(dict(f=f, predicted_ratio=expected_ratio(f, **model),
                        measured_ratio=ours["swarm_samples_per_s"].median() / theirs["swarm_samples_per_s"].median(),
                        time_to_target_ratio=theirs[time_column].median() / ours[time_column].median(),
                        crossover=crossover(**model), **{k: v for k, v in model.items() if k != "peers"}))  # fmt: skip
    return pd.DataFrame(out)
