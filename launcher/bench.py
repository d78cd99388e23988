"""`gossip-launch bench [--quick] [--out DIR]`: what gossip costs on this machine, measured side by side in one run
(these machines are noisy: only ratios of figures taken minutes apart mean anything).

- G1 throughput: mean samples/s per peer of `gossip` (blocking and with `overlap`) and `allreduce` over `none`, the
  same config otherwise: cifar10_gossip.yaml's knobs (group 16, min 2, alpha 1, matchmaking 5 s) on `cifar_cnn` with
  generated CIFAR-format data, 4 peers, at H = 10 and 50 local steps per round.
- G2 one round: a hivemind averaging round (matchmaking included; the group is the whole swarm) against one gloo
  all-reduce of the same bytes, for 1, 10 and 100 MB, groups of 2 and 4, and with float16 and uint8 compression.
- G7 start-up: from the run's start to every peer's first step, against bare Ray starting N no-op actors.

Writes bench.csv (one row per measurement) and bench.md (the tables) in a folder of its own under --out.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path

import pandas as pd
import torch

from launcher.driver import run_experiment
from launcher.results import read_events, read_metrics
from workers.config import ExperimentConfig, load_config
from workers.network import free_port

logger = logging.getLogger("launcher.bench")

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT / "configs" / "experiments" / "cifar10_gossip.yaml"
QUICKSTART = ROOT / "configs" / "experiments" / "quickstart.yaml"
G1_METHODS = {"none": [], "allreduce": ["gossip.method=allreduce"], "gossip": [],
              "gossip+overlap": ["gossip.overlap=true"]}  # fmt: skip
REPEATS = 3  # G2: rounds per setting (the median is reported)


def run_bench(out: Path, quick: bool) -> Path:
    import ray

    bench_dir = Path(out).expanduser() / f"bench-{datetime.now():%Y%m%d-%H%M%S}"
    bench_dir.mkdir(parents=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    logger.info("bench on %s -> %s", device, bench_dir)
    ray.init(address="local", num_cpus=max(8, os.cpu_count() or 1), include_dashboard=False, logging_level="WARNING")
    try:
        rows = [*throughput(bench_dir, quick), *startup(bench_dir, quick)]
    finally:
        ray.shutdown()
    rows += one_round(quick)
    table = pd.DataFrame(rows).assign(device=device)
    table.to_csv(bench_dir / "bench.csv", index=False)
    (bench_dir / "bench.md").write_text(markdown(table, device))
    logger.info("bench:\n%s", markdown(table, device))
    return bench_dir


# -- G1 ----------------------------------------------------------------------------------------------------------


def cifar_config(data_root: Path, method: str, every_steps: int, *extra: str) -> ExperimentConfig:
    gpu = 1 / 4 if torch.cuda.is_available() else 0  # 4 peers share the one GPU a bench machine has
    overrides = [f"data.root={data_root}", "data.verify_checksums=false", "data.num_workers=0", "data.augment=false",
                 "optim.epochs=2", f"resources.num_gpus={gpu}", "resources.num_cpus=0.5", "peers=4",
                 f"gossip.every_steps={every_steps}", *G1_METHODS[method], *extra]  # fmt: skip
    if method == "none":
        overrides.append("gossip.method=none")
    return load_config(CIFAR, overrides)


def throughput(bench_dir: Path, quick: bool) -> list[dict]:
    from workers.synthetic import write_tiny_cifar10

    data_root = write_tiny_cifar10(Path(tempfile.mkdtemp(prefix="bench-cifar-")), n_train=8000, n_test=500)
    rows = []
    for every_steps in (10,) if quick else (10, 50):
        speeds = {}
        for method in G1_METHODS:
            result = run_experiment(cifar_config(data_root, method, every_steps), bench_dir / "g1")
            metrics = read_metrics(result.run_dir)
            speeds[method] = metrics.samples_per_s.mean()
            rows.append(dict(bench="G1", what=method, every_steps=every_steps, samples_per_s=speeds[method],
                             ratio=speeds[method] / speeds["none"], rounds_ok=int(metrics.avg_rounds_ok.max()),
                             avg_seconds=metrics.avg_seconds.sum() / 4, run=result.run_dir.name))  # fmt: skip
    return rows


# -- G7 ----------------------------------------------------------------------------------------------------------


def startup(bench_dir: Path, quick: bool) -> list[dict]:
    import ray

    @ray.remote(num_cpus=0.25)
    class Noop:
        def ping(self) -> int:
            return os.getpid()

    rows = []
    for peers in (4,) if quick else (4, 8):
        cfg = load_config(QUICKSTART, [f"peers={peers}", "optim.epochs=1", "gossip.method=none",
                                       "resources.num_cpus=0.25"])  # fmt: skip
        result = run_experiment(cfg, bench_dir / "g7")
        started = read_events(result.run_dir).query("event == 'started'").time_s.max()
        began = time.perf_counter()
        actors = [Noop.remote() for _ in range(peers)]
        ray.get([actor.ping.remote() for actor in actors])
        bare = time.perf_counter() - began
        for actor in actors:
            ray.kill(actor)
        rows.append(dict(bench="G7", what=f"{peers} peers", seconds=started, bare_ray_s=bare, ratio=started / bare))
    return rows


# -- G2 ----------------------------------------------------------------------------------------------------------


def one_round(quick: bool) -> list[dict]:
    rows = []
    for megabytes in (1, 10) if quick else (1, 10, 100):
        for group in (2, 4):
            gloo = median_round(_gloo_rounds, group, megabytes)
            for codec in ("none", "float16", "uint8") if megabytes >= 10 or not quick else ("none",):
                seconds = median_round(_hivemind_rounds, group, megabytes, codec)
                rows.append(dict(bench="G2", what=f"{megabytes} MB, group of {group}", compression=codec,
                                 seconds=seconds, gloo_s=gloo, ratio=seconds / gloo))  # fmt: skip
    return rows


def median_round(target, group: int, megabytes: int, *args) -> float:
    """Start `group` processes running `target`; each times REPEATS rounds; a round lasts as long as its slowest."""
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
    return statistics.median(max(round_times) for round_times in zip(*per_rank, strict=True))


def _gloo_rounds(rank: int, group: int, megabytes: int, port: int, rendezvous, times) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=group)
    tensor, measured = torch.randn(megabytes * 2**20 // 4), []
    for _ in range(REPEATS):
        dist.barrier()
        began = time.perf_counter()
        dist.all_reduce(tensor)
        measured.append(time.perf_counter() - began)
    times.put(measured)
    dist.destroy_process_group()


def _hivemind_rounds(rank: int, group: int, megabytes: int, port: int, rendezvous, times, codec: str) -> None:
    import hivemind

    from workers.gossip import compression, swarm_averager_class

    mp.set_start_method("fork", force=True)  # hivemind forks its DHT and averager processes (a spawned child spawns)
    initial = [] if rank == 0 else rendezvous.get(timeout=120)
    dht = hivemind.DHT(initial_peers=initial, host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    if rank == 0:
        for _ in range(group - 1):
            rendezvous.put([str(addr) for addr in dht.get_visible_maddrs()])
    averager = swarm_averager_class()([torch.randn(megabytes * 2**20 // 4)], dht, prefix="bench",
                                      target_group_size=group, min_group_size=group, min_matchmaking_time=5.0,
                                      request_timeout=2.0, allreduce_timeout=120, compression=compression(codec),
                                      start=True)  # fmt: skip
    measured = []
    for _ in range(REPEATS):
        began = time.perf_counter()
        averager.step(timeout=120)  # the group is the whole swarm: it starts once everyone has joined
        measured.append(time.perf_counter() - began)
    times.put(measured)
    averager.shutdown()
    dht.shutdown()


# -- report --------------------------------------------------------------------------------------------------------


def markdown(table: pd.DataFrame, device: str) -> str:
    parts = [f"Measured on {device}, {datetime.now():%Y-%m-%d}.\n"]
    for bench, columns in [("G1", ["what", "every_steps", "samples_per_s", "ratio", "rounds_ok", "avg_seconds"]),
                           ("G2", ["what", "compression", "seconds", "gloo_s", "ratio"]),
                           ("G7", ["what", "seconds", "bare_ray_s", "ratio"])]:  # fmt: skip
        rows = table[table.bench == bench]
        if len(rows):
            parts.append(f"### {bench}\n\n{markdown_table(rows[columns])}\n")
    return "\n".join(parts)


def markdown_table(frame: pd.DataFrame) -> str:
    def cell(value) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)
