"""`gossip-launch bench [--quick] [--out DIR] [--repeats N] [--only PART...]`: what a round costs on this machine,
against the baselines a user would pick instead, measured side by side in one run (these machines are noisy: only ratios
of figures taken in one run mean anything).

- C, round cost (and G1 throughput from the same runs): the 4-peer (and, without --quick, 8-peer) cifar_cnn swarm
  on generated CIFAR-format data at H = 10, run with `none` and with each method (`gossip`, the same overlapped,
  with `gossip.sticky_transport: hivemind` (the whole swarm's group kept by hivemind, not moved onto gloo), and with
  `gossip.cheap_rounds: false` = plain hivemind; `allreduce` = gloo on the same tensors; `sgp` blocking and
  overlapped), REPEATS times interleaved (none, m1, m2, ..., none, m1, ...), so slow drifts of a shared machine hit
  every method alike. For each run: the whole machine's busy CPU (/proc/stat: the driver, Ray, the actors, hivemind's
  processes, p2pd) between the launcher's "started training" line and its last epoch line; c = (that - the same
  repeat's `none`) / peer-rounds.
  Reported: the median c with its range, the `none`-against-`none` noise floor in the same unit, the share of rounds
  that succeeded and the final consensus against `none`'s (a cheap round that fails or averages nothing is no
  saving), and samples/s per peer over `none`'s (G1), median over the repeats. Without --quick also at H = 50.
- G2 one round: a hivemind averaging round (matchmaking included; the group is the whole swarm) against one gloo
  all-reduce of the same bytes, for 1, 10 and 100 MB, groups of 2 and 4, with float16 and uint8 compression; where
  its time goes (matchmaking, all-reduce, the averager's and p2pd's CPU, serialization). And resnet50's 267 tensors
  (94 MB) against one tensor of the same bytes, with the project's flat buffers and without (plain hivemind).
- G7 start-up: from the run's start to every peer's first step, against N Ray actors that import torch and build the
  same model and a torch.optim optimizer (what any PyTorch launcher on Ray pays), and N no-op actors; 3 repeats,
  interleaved (1 with --quick), the median ratio and its range.
- G5 a straggler's failed rounds, blocking and overlapped; G8 tens of peers: 8 to 24 peers in groups of 8, the rounds
  that succeed and the control plane's CPU per peer-round (where a machine's cores run out).

Writes bench.csv (one row per measurement) and bench.md (the tables) in a folder of its own under --out.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path

import pandas as pd
import torch

from launcher.driver.controller import run_experiment
from launcher.results.summary import read_events, read_metrics, round_totals
from workers.core.config import load_config
from workers.core.network import free_port

logger = logging.getLogger("launcher.bench")

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT / "configs" / "experiments" / "cifar10_gossip.yaml"
QUICKSTART = ROOT / "configs" / "experiments" / "quickstart.yaml"
METHODS = {"none": ["gossip.method=none"], "gossip": [],
           "gossip (hivemind sticky)": ["gossip.sticky_transport=hivemind"],
           "gossip (plain hivemind)": ["gossip.cheap_rounds=false"], "gossip (overlap)": ["gossip.overlap=true"],
           "allreduce": ["gossip.method=allreduce"], "sgp": ["gossip.method=sgp"],
           "sgp (overlap)": ["gossip.method=sgp", "gossip.overlap=true"]}  # fmt: skip
REPEATS = 3  # G2: rounds per setting (the median is reported)


def run_bench(out: Path, quick: bool, repeats: int | None = None, only: list[str] | None = None) -> Path:
    import ray

    bench_dir = Path(out).expanduser() / f"bench-{datetime.now():%Y%m%d-%H%M%S}"
    bench_dir.mkdir(parents=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    logger.info("bench on %s -> %s", device, bench_dir)
    repeats = repeats or (2 if quick else 5)
    ray.init(address="local", num_cpus=max(8, os.cpu_count() or 1), include_dashboard=False, logging_level="WARNING")
    parts, rows = set(only or ["cost", "round", "startup", "straggler", "scale"]), []
    try:
        if "cost" in parts:  # (peers, H, epochs): 16 epochs of 4 peers at H = 10 are about 400 peer-rounds per run
            data_root = cifar_data()
            for peers, every_steps, epochs in [(4, 10, 4)] if quick else [(4, 10, 16), (8, 10, 8), (4, 50, 16)]:
                methods = list(METHODS) if every_steps == 10 else ["none", "gossip", "allreduce"]
                rows += round_cost(bench_dir, data_root, peers, every_steps, epochs, repeats, methods)
        if "startup" in parts:
            rows += startup(bench_dir, quick)
        if "straggler" in parts:
            rows += straggler_rounds(bench_dir)
        if "scale" in parts:
            rows += swarm_scale(bench_dir)
    finally:
        ray.shutdown()
    if "round" in parts:
        rows += one_round(quick)
    table = pd.DataFrame(rows).assign(device=device)
    table.to_csv(bench_dir / "bench.csv", index=False)
    (bench_dir / "bench.md").write_text(markdown(table, device))
    logger.info("bench:\n%s", markdown(table, device))
    return bench_dir


# -- C and G1 -----------------------------------------------------------------------------------------------------


def cifar_data(n_train: int = 8000) -> Path:
    from workers.peer.synthetic import write_tiny_cifar10

    return write_tiny_cifar10(Path(tempfile.mkdtemp(prefix="bench-cifar-")), n_train=n_train, n_test=500)


def busy_cpu_s() -> float:
    """The whole machine's busy CPU-seconds so far (every process: user, nice, system, irq, softirq)."""
    with open("/proc/stat") as stat:
        fields = stat.readline().split()
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


PROCESS_KINDS = ("peer actors", "hivemind processes", "p2pd", "ray", "driver", "other")


def process_kind(process, actors: set[int], forked: set[int]) -> str:
    """Which part of a run a process is: a peer's actor, a hivemind process it forked (DHT, averager: they keep the
    actor's process title), a p2pd daemon, Ray's own (raylet, GCS, idle workers), this driver, or anything else."""
    name = process.name()
    if name == "p2pd":
        return "p2pd"
    if process.pid in actors:
        return "peer actors"
    if process.pid in forked:
        return "hivemind processes"
    if process.pid == os.getpid():
        return "driver"
    if name.startswith(("ray::", "raylet", "gcs_server")) or "ray" in " ".join(process.cmdline()[:2]):
        return "ray"
    return "other"


def cpu_by_process(kinds: dict[int, str] | None = None) -> dict[int, tuple[str, float]]:
    """Every process's (kind, CPU seconds so far); `kinds`: the kinds already known by pid (kept)."""
    import psutil

    found, processes = {}, list(psutil.process_iter())
    parents = {}
    for process in processes:
        with contextlib.suppress(psutil.Error):
            parents[process.pid] = process.ppid()
    titled = {p.pid for p in processes if _name(p).startswith("ray::PeerActor")}
    actors = {pid for pid in titled if parents.get(pid) not in titled}  # the actor; its forks keep its title
    forked = set()
    for pid in parents:  # every process below an actor that is not p2pd
        ancestor = parents.get(pid)
        while ancestor is not None and ancestor not in actors and ancestor in parents and ancestor > 1:
            ancestor = parents.get(ancestor)
        if ancestor in actors:
            forked.add(pid)
    for process in processes:
        try:
            kind = (kinds or {}).get(process.pid) or process_kind(process, actors, forked)
            found[process.pid] = (kind, sum(process.cpu_times()[:2]))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _name(process) -> str:
    try:
        return process.name()
    except Exception:
        return ""


def cpu_by_kind(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds each kind of process spent between two snapshots (a process born in between: all of its CPU)."""
    spent = dict.fromkeys(PROCESS_KINDS, 0.0)
    for pid, (kind, cpu) in after.items():
        spent[kind] += cpu - before[pid][1] if pid in before else cpu
    return spent


class TrainingWindow(logging.Handler):
    """Notes the machine's busy CPU, each process's CPU and the time when the launcher logs that every peer started
    training and when it logs the last epoch's line: start-up and shutdown are left out."""

    def __init__(self, epochs: int):
        super().__init__()
        self.last = f"epoch {epochs}/{epochs} "
        self.start: tuple[float, float] | None = None
        self.end: tuple[float, float] | None = None
        self.processes: list[dict[int, tuple[str, float]]] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if self.start is None and "started training" in message:
            self.start = (busy_cpu_s(), time.monotonic())
            self.processes.append(cpu_by_process())
        elif self.start is not None and self.end is None and message.startswith(self.last):
            self.end = (busy_cpu_s(), time.monotonic())
            self.processes.append(cpu_by_process({pid: kind for pid, (kind, _) in self.processes[0].items()}))


def measured_run(bench_dir: Path, data_root: Path, method: str, peers: int, every_steps: int, epochs: int) -> dict:
    overrides = [f"data.root={data_root}", "data.verify_checksums=false", "data.num_workers=0", "data.augment=false",
                 "data.test_batch_size=500", f"optim.epochs={epochs}", f"peers={peers}", "resources.num_cpus=0.25",
                 f"resources.num_gpus={1 / peers if torch.cuda.is_available() else 0}",
                 f"gossip.every_steps={every_steps}", *METHODS[method]]  # fmt: skip
    run, _ = windowed_run(load_config(CIFAR, overrides), bench_dir / "runs")
    if run["exit_code"] != 0 or "cpu_s" not in run:
        raise RuntimeError(f"bench run {method} ({run['run']}): exit {run['exit_code']}, training window "
                           f"{'found' if 'cpu_s' in run else 'not found'}")  # fmt: skip
    return {key: value for key, value in run.items() if key != "exit_code"}


def windowed_run(cfg, out: Path) -> tuple[dict, pd.DataFrame]:
    """Run `cfg`; the machine's busy CPU in its training window (cpu_s, wall_s, cpu_s_<kind> per kind of process, when
    the window was found), its rounds, its final consensus, its peers' mean samples/s, and its exit code; and its
    metrics rows."""
    epochs = cfg.optim.epochs
    window = TrainingWindow(epochs)
    launcher = logging.getLogger("launcher")
    level, launcher.level = launcher.level, logging.INFO
    launcher.addHandler(window)
    try:
        result = run_experiment(cfg, out)
    finally:
        launcher.removeHandler(window)
        launcher.setLevel(level)
    metrics = read_metrics(result.run_dir)
    totals = round_totals(metrics)
    final = metrics[metrics.epoch == epochs].consensus_dist
    run = dict(exit_code=result.exit_code, rounds_ok=int(totals.rounds_ok.sum()),
               rounds_failed=int(totals.rounds_failed.sum()), consensus=float(final.iloc[0]) if len(final) else None,
               samples_per_s=float(metrics.samples_per_s.mean()), run=result.run_dir.name)  # fmt: skip
    if window.start is not None and window.end is not None:
        kinds = {f"cpu_s_{kind.replace(' ', '_')}": spent for kind, spent in cpu_by_kind(*window.processes).items()}
        run.update(cpu_s=window.end[0] - window.start[0], wall_s=window.end[1] - window.start[1], **kinds)
    return run, metrics


def round_cost(bench_dir: Path, data_root: Path, peers: int, every_steps: int, epochs: int, repeats: int,
               methods: list[str]) -> list[dict]:  # fmt: skip
    """One row per run (bench "C"): the methods interleaved with `none`, `repeats` times."""
    rows = []
    for repeat in range(repeats):
        for method in methods:
            logger.info("C: %s, %d peers, H=%d, repeat %d/%d", method, peers, every_steps, repeat + 1, repeats)
            run = measured_run(bench_dir, data_root, method, peers, every_steps, epochs)
            rows.append(dict(bench="C", what=method, peers=peers, every_steps=every_steps, epochs=epochs,
                             repeat=repeat, **run))  # fmt: skip
    return rows


def cost_runs(out: Path, methods: list[str], repeats: int, data_root: Path | None = None, peers: int = 4,
              every_steps: int = 10, epochs: int = 16) -> pd.DataFrame:  # fmt: skip
    """Bench C's runs of `methods` alone at one setting, on a local Ray of its own (a study beside the bench, e.g.
    results/examples/bench/sgp-*/): one row per run, also written to `out`/runs.csv."""
    import ray

    out.mkdir(parents=True, exist_ok=True)
    ray.init(address="local", num_cpus=8, include_dashboard=False, logging_level="WARNING")
    try:
        rows = round_cost(out, data_root or cifar_data(), peers, every_steps, epochs, repeats, methods)
    finally:
        ray.shutdown()
    runs = pd.DataFrame(rows)
    runs.to_csv(out / "runs.csv", index=False)
    return runs


def excess_ms(arm: pd.DataFrame, none: pd.DataFrame, column: str, rounds: pd.Series) -> pd.Series:
    """Per repeat, a CPU column's excess over the same repeat's `none` run, in ms per peer-round."""
    return 1000 * (arm[column] - none[column].reindex(arm.index)) / rounds.clip(lower=1)


def round_cost_summary(runs: pd.DataFrame) -> pd.DataFrame:
    """Per setting and method: c (ms of machine CPU per peer-round over `none`'s run of the same repeat), its range,
    the none-against-none floor, the rounds' success share, consensus against none's, and G1's samples/s ratio."""
    out = []
    for (peers, every_steps), setting in runs.groupby(["peers", "every_steps"], sort=False):
        none = setting[setting.what == "none"].set_index("repeat")
        for method, arm in setting[setting.what != "none"].groupby("what", sort=False):
            arm = arm.set_index("repeat")
            rounds = arm.rounds_ok + arm.rounds_failed
            c = excess_ms(arm, none, "cpu_s", rounds)
            floor = (none.cpu_s.diff().abs().dropna() * 1000 / rounds.median()).median() if len(none) > 1 else None
            out.append(dict(what=method, peers=peers, every_steps=every_steps, c_ms=c.median(), c_min=c.min(),
                            c_max=c.max(), floor_ms=floor, peer_rounds=rounds.median(),
                            ok_share=arm.rounds_ok.sum() / max(rounds.sum(), 1), consensus=arm.consensus.median(),
                            none_consensus=none.consensus.median(), samples_per_s=arm.samples_per_s.median(),
                            g1_ratio=(arm.samples_per_s / none.samples_per_s.reindex(arm.index)).median(),
                            **{f"c_{column[len('cpu_s_'):]}_ms": excess_ms(arm, none, column, rounds).median()
                               for column in arm.columns if column.startswith("cpu_s_")}))  # fmt: skip
    return pd.DataFrame(out)


# -- G7 ----------------------------------------------------------------------------------------------------------


def startup(bench_dir: Path, quick: bool, repeats: int = 3) -> list[dict]:
    """Seconds from the run's start to every peer's first step, against N Ray actors that import torch, build the
    quickstart's model and a torch.optim optimizer and take one step (the fair denominator), and N no-op actors:
    `repeats` times, interleaved (the run, then each arm; odd repeats the torch arm first, so neither always starts
    on a warmer machine), each ratio taken within its repeat; the medians and the ratio's range (one start-up of 8
    peers on 2 cores varied 1.16-1.30 against the same arm)."""
    import ray

    @ray.remote(num_cpus=0.25)
    class Noop:
        def ready(self, model_cfg) -> int:
            return os.getpid()

    @ray.remote(num_cpus=0.25)
    class TorchPeer:
        def ready(self, model_cfg) -> int:
            import torch

            from workers.peer.models import build_model

            model = build_model(model_cfg, 10, (1, 8, 8))
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            model(torch.zeros(2, 1, 8, 8)).sum().backward()
            optimizer.step()
            return os.getpid()

    rows = []
    for peers in (4,) if quick else (4, 8):
        cfg = load_config(QUICKSTART, [f"peers={peers}", "optim.epochs=1", "gossip.method=none",
                                       "resources.num_cpus=0.25"])  # fmt: skip

        def actors_up(actor_class, peers=peers, model_cfg=cfg.model) -> float:
            began = time.perf_counter()
            actors = [actor_class.remote() for _ in range(peers)]
            ray.get([actor.ready.remote(model_cfg) for actor in actors])
            for actor in actors:
                ray.kill(actor)
            return time.perf_counter() - began

        times = []
        for repeat in range(1 if quick else repeats):
            arms = {} if repeat % 2 == 0 else {"torch_actors_s": actors_up(TorchPeer)}  # (odd repeats: the arm first)
            result = run_experiment(cfg, bench_dir / "g7")
            arms["seconds"] = read_events(result.run_dir).query("event == 'started'").time_s.max()
            arms.setdefault("torch_actors_s", actors_up(TorchPeer))
            arms["bare_ray_s"] = actors_up(Noop)
            times.append(arms)
        times = pd.DataFrame(times)
        ratios, bare = times.seconds / times.torch_actors_s, times.seconds / times.bare_ray_s
        rows.append(dict(bench="G7", what=f"{peers} peers", repeats=len(times), **times.median().to_dict(),
                         ratio=ratios.median(), ratio_range=f"{ratios.min():.2f}-{ratios.max():.2f}",
                         bare_ratio=bare.median()))  # fmt: skip
    return rows


# -- G5 ----------------------------------------------------------------------------------------------------------


def straggler_rounds(bench_dir: Path) -> list[dict]:
    """What a straggler's failed rounds cost its training thread, blocking and overlapped: 8 peers, the quickstart,
    H = 10, groups of 4 (at least 2), 1 s of matchmaking, peer 0 slowed 4x. A failed round, overlapped or not, should
    cost no more than a blocking one (about matchmaking_time)."""
    rows = []
    for overlap in (False, True):
        cfg = load_config(QUICKSTART, ["peers=8", "gossip.every_steps=10", "gossip.group_size=4",
                                       "resources.num_cpus=0.25", "gossip.min_group_size=2",
                                       "gossip.matchmaking_time=1", f"gossip.overlap={overlap}",
                                       "scenario=[{peer: 0, event: slow, factor: 4}]"])  # fmt: skip
        result = run_experiment(cfg, bench_dir / "g5")
        metrics = read_metrics(result.run_dir)
        straggler = round_totals(metrics).loc[0]
        rounds = straggler.rounds_ok + straggler.rounds_failed
        wall = metrics.sort_values("epoch").groupby("peer").wall_time_s.last()  # each peer's last row
        averaging_s = metrics[metrics.peer == 0].averaging_seconds.sum()
        rows.append(dict(bench="G5", what="overlap" if overlap else "blocking", rounds=int(rounds),
                         failed=int(straggler.rounds_failed), straggler_s=wall.loc[0],
                         others_s=wall.drop(index=0).median(), averaging_s=averaging_s,
                         seconds_per_round=averaging_s / max(rounds, 1), run=result.run_dir.name))  # fmt: skip
    return rows


# -- G8 ----------------------------------------------------------------------------------------------------------

SCALE = [(8, 2.0), (16, 2.0), (24, 2.0), (24, 6.0)]  # (peers, matchmaking_time)


def swarm_scale(bench_dir: Path, points: list[tuple[int, float]] = SCALE, epochs: int = 4) -> list[dict]:
    """Tens of peers (G8): the quickstart (digits, a round per epoch) with groups of 8 at each (swarm size,
    matchmaking_time), and `none` at the largest size: the rounds that succeeded, the consensus against none's, the
    seconds a round took, and the control plane's CPU (hivemind's processes and p2pd) per peer-round: where the
    machine runs out of cores for the rounds of a larger swarm."""
    rows = []
    for peers, matchmaking in [*points, (max(peers for peers, _ in points), None)]:
        method = ["gossip.method=none"] if matchmaking is None else [f"gossip.matchmaking_time={matchmaking}"]
        cfg = load_config(QUICKSTART, [f"peers={peers}", f"optim.epochs={epochs}", "gossip.group_size=8",
                                       "resources.num_cpus=0.25", *method])  # fmt: skip
        logger.info("G8: %d peers, %s", peers, method[0])
        run, metrics = windowed_run(cfg, bench_dir / "g8")
        rounds = run["rounds_ok"] + run["rounds_failed"]
        control = run.get("cpu_s_hivemind_processes", math.nan) + run.get("cpu_s_p2pd", math.nan)
        rows.append(dict(bench="G8", what="none" if matchmaking is None else "gossip", peers=peers,
                         matchmaking_time=matchmaking, rounds=rounds,
                         ok_share=run["rounds_ok"] / rounds if rounds else math.nan, consensus=run["consensus"],
                         round_s=metrics.averaging_seconds[metrics.averaging_seconds > 0].median(),
                         control_ms=1000 * control / rounds if rounds else math.nan,
                         cores_busy=run.get("cpu_s", math.nan) / run.get("wall_s", math.nan),
                         **{key: run[key] for key in ("cpu_s", "wall_s", "run") if key in run}))  # fmt: skip
    rows = pd.DataFrame(rows)
    none = rows[rows.what == "none"].consensus.iloc[0]
    return rows.assign(consensus_vs_none=rows.consensus / none).to_dict("records")


# -- G2 ----------------------------------------------------------------------------------------------------------


def one_round(quick: bool) -> list[dict]:
    rows = []
    for megabytes in (1, 10) if quick else (1, 10, 100):
        for group in (2, 4):
            gloo = median_round(_gloo_rounds, group, megabytes)["seconds"]
            for codec in ("none", "float16", "uint8") if megabytes >= 10 or not quick else ("none",):
                hivemind = median_round(_hivemind_rounds, group, megabytes, codec)
                serialize_s = serialization_seconds(bench_tensor(megabytes), codec)  # here, alone
                rows.append(dict(bench="G2", what=f"{megabytes} MB, group of {group}", compression=codec, **hivemind,
                                 gloo_s=gloo, ratio=hivemind["seconds"] / gloo,
                                 allreduce_ratio=hivemind["allreduce_s"] / gloo, serialize_s=serialize_s))  # fmt: skip
    if not quick:  # resnet50's 267 tensors against one tensor of the same bytes (a group of 2: 2 cores)
        single = median_round(_hivemind_rounds, 2, 0, "none", "resnet50 as one tensor")
        for shapes, flat in (("resnet50", True), ("resnet50", False)):
            many = median_round(_hivemind_rounds, 2, 0, "none", shapes, flat)
            rows.append(dict(bench="G2", what=f"resnet50, 267 tensors, {'flat buffers' if flat else 'plain hivemind'}",
                             compression="none", **many, single_s=single["seconds"],
                             ratio=many["seconds"] / single["seconds"]))  # fmt: skip
    return rows


def median_round(target, group: int, megabytes: int, *args) -> dict[str, float]:
    """Start `group` processes running `target`; each times REPEATS rounds (a dict of figures per round). A round
    lasts as long as its slowest member: each figure is the median over rounds of its maximum over members."""
    context = mp.get_context("spawn")  # fresh processes: no Ray, no hivemind state of the driver
    times, rendezvous = context.Queue(), context.Queue()
    port = free_port("127.0.0.1")
    procs = [context.Process(target=target, args=(rank, group, megabytes, port, rendezvous, times, *args))
             for rank in range(group)]  # fmt: skip
    for proc in procs:
        proc.start()
    try:
        per_rank = [times.get(timeout=180) for _ in procs]
    finally:
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
    rounds = list(zip(*per_rank, strict=True))  # per round: each member's figures
    return {key: statistics.median(max(member[key] for member in members) for members in rounds)
            for key in per_rank[0][0]}  # fmt: skip


def bench_tensor(megabytes: int) -> torch.Tensor:
    """The float32 tensor of `megabytes` MiB that G2 averages."""
    return torch.randn(megabytes * 2**20 // 4)


def bench_tensors(megabytes: int, shapes: str) -> list[torch.Tensor]:
    """What a G2 round averages: one tensor of `megabytes` MiB, resnet50's averaged tensors (267, 94 MB), or one
    tensor of as many bytes."""
    if not shapes.startswith("resnet50"):
        return [bench_tensor(megabytes)]
    from workers.averaging.base import averaged_tensors
    from workers.peer.models import resnet50_small_inputs

    tensors = [t.clone() for t in averaged_tensors(resnet50_small_inputs(200))]
    return tensors if shapes == "resnet50" else [torch.cat([t.flatten() for t in tensors])]


def _gloo_rounds(rank: int, group: int, megabytes: int, port: int, rendezvous, times) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=group)
    tensor, measured = bench_tensor(megabytes), []
    for _ in range(REPEATS):
        dist.barrier()
        began = time.perf_counter()
        dist.all_reduce(tensor)
        measured.append(dict(seconds=time.perf_counter() - began))
    times.put(measured)
    dist.destroy_process_group()


def _hivemind_rounds(rank: int, group: int, megabytes: int, port: int, rendezvous, times, codec: str,
                     shapes: str = "single", flat: bool = True) -> None:  # fmt: skip
    """Each round in two phases: matchmaking (hivemind's step with require_trigger, until the group is assembled)
    and the all-reduce (after allow_allreduce); with the CPU this peer's processes spent on it. `flat`: the tensors
    go as one flat buffer (the project's gossip), else one part or more per tensor (plain hivemind)."""
    import hivemind
    import psutil
    from hivemind.averaging.control import AveragingStage

    from workers.averaging.flat import FlatLayout
    from workers.averaging.gossip import PART_SIZE_BYTES, compression, swarm_averager_class
    from workers.averaging.levers import Levers

    mp.set_start_method("fork", force=True)  # hivemind forks its DHT and averager processes (a spawned child spawns)
    initial = [] if rank == 0 else rendezvous.get(timeout=120)
    dht = hivemind.DHT(initial_peers=initial, host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    if rank == 0:
        for _ in range(group - 1):
            rendezvous.put([str(addr) for addr in dht.get_visible_maddrs()])
    tensors = bench_tensors(megabytes, shapes)
    tensors = FlatLayout(tensors).buffers(tensors) if flat else tensors
    levers = Levers(sticky=False, gloo=False, flat=flat)  # every round matchmade (G2 times matchmaking)
    averager = swarm_averager_class()(tensors, dht, prefix="bench", target_group_size=group, min_group_size=group,
                                      min_matchmaking_time=5.0, request_timeout=2.0, allreduce_timeout=120,
                                      compression=compression(codec), part_size_bytes=PART_SIZE_BYTES, levers=levers,
                                      start=True)  # fmt: skip
    helpers = psutil.Process().children(recursive=True)  # the DHT's and the averager's processes, and p2pd

    def cpu(name_is_p2pd: bool) -> float:
        return sum(sum(p.cpu_times()[:2]) for p in helpers if (p.name() == "p2pd") == name_is_p2pd)

    measured = []
    for _ in range(REPEATS):
        python_cpu, p2pd_cpu, began = cpu(False), cpu(True), time.perf_counter()
        control = averager.step(timeout=120, require_trigger=True, wait=False)  # starts once everyone has joined
        while control.stage != AveragingStage.AWAITING_TRIGGER and not control.done():
            time.sleep(0.001)
        matched = time.perf_counter()
        control.allow_allreduce()
        control.result()
        ended = time.perf_counter()
        measured.append(dict(seconds=ended - began, matchmaking_s=matched - began, allreduce_s=ended - matched,
                             averager_cpu_s=cpu(False) - python_cpu, p2pd_cpu_s=cpu(True) - p2pd_cpu))  # fmt: skip
    times.put(measured)
    averager.shutdown()
    dht.shutdown()


def serialization_seconds(tensor: torch.Tensor, codec: str) -> float:
    """Serialize and deserialize `tensor` once, in the parts the gossip all-reduce cuts it into, with `codec`."""
    from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor

    from workers.averaging.gossip import PART_SIZE_BYTES, compression

    codec_type = compression(codec).compression_type
    began = time.perf_counter()
    for part in tensor.split(PART_SIZE_BYTES // tensor.element_size()):
        deserialize_torch_tensor(serialize_torch_tensor(part, codec_type))
    return time.perf_counter() - began


# -- report --------------------------------------------------------------------------------------------------------


def markdown(table: pd.DataFrame, device: str) -> str:
    parts = [f"Measured on {device}, {datetime.now():%Y-%m-%d}.\n"]
    runs = table[table.bench == "C"] if "bench" in table else table.iloc[:0]
    if len(runs):
        summary = round_cost_summary(runs)
        kinds = [column for column in summary.columns if column.startswith("c_") and column.endswith("_ms")
                 and column != "c_ms"]  # fmt: skip
        parts.append("### C: machine CPU per peer-round over `none` (cifar_cnn), and G1 throughput over `none`\n\n"
                     f"{markdown_table(summary.drop(columns=kinds))}\n")  # fmt: skip
        if kinds:
            parts.append("### Where c goes: each kind of process's CPU per peer-round over `none`'s (ms)\n\n"
                         f"{markdown_table(summary[['what', 'peers', 'every_steps', 'c_ms', *kinds]])}\n")  # fmt: skip
    for bench, columns in [("G2", ["what", "compression", "seconds", "gloo_s", "single_s", "ratio", "matchmaking_s",
                                   "allreduce_s", "allreduce_ratio", "averager_cpu_s", "p2pd_cpu_s", "serialize_s"]),
                           ("G5", ["what", "rounds", "failed", "straggler_s", "others_s", "averaging_s",
                                   "seconds_per_round"]),
                           ("G7", ["what", "repeats", "seconds", "torch_actors_s", "ratio", "ratio_range", "bare_ray_s",
                                   "bare_ratio"]),
                           ("G8", ["what", "peers", "matchmaking_time", "rounds", "ok_share", "consensus",
                                   "consensus_vs_none", "round_s", "control_ms", "cores_busy"])]:  # fmt: skip
        rows = table[table.bench == bench]
        if len(rows):
            shown = [column for column in columns if column in rows and rows[column].notna().any()]
            parts.append(f"### {bench}\n\n{markdown_table(rows[shown])}\n")
    return "\n".join(parts)


def markdown_table(frame: pd.DataFrame) -> str:
    def cell(value) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)
