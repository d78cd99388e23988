"""`gossip-launch bench [--quick] [--out DIR]`: what gossip costs on this machine, measured side by side in one run
(these machines are noisy: only ratios of figures taken minutes apart mean anything).

- G1 throughput: mean samples/s per peer of `gossip` (blocking and with `overlap`), `sgp` and `allreduce` over `none`,
  the same config otherwise: cifar10_gossip.yaml's knobs (group 16, min 2, alpha 1, matchmaking 5 s), 4 peers, on
  generated CIFAR-format data: `cifar_cnn` (0.25 MB of parameters) at H = 10 and 50 local steps per round, and
  `resnet50` (94 MB) for 15 steps at H = 5 (not with --quick: a step is seconds long on a CPU).
- G2 one round: a hivemind averaging round (matchmaking included; the group is the whole swarm) against one gloo
  all-reduce of the same bytes, for 1, 10 and 100 MB, groups of 2 and 4, and with float16 and uint8 compression;
  with where its time goes: matchmaking and all-reduce apart, the CPU a peer's averager and DHT processes and its
  p2pd daemon spent on the round, and the time to serialize and deserialize the tensor's parts once.
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

from launcher.driver.controller import run_experiment
from launcher.results.summary import read_events, read_metrics
from workers.core.config import ExperimentConfig, load_config
from workers.core.network import free_port

logger = logging.getLogger("launcher.bench")

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT / "configs" / "experiments" / "cifar10_gossip.yaml"
QUICKSTART = ROOT / "configs" / "experiments" / "quickstart.yaml"
G1_METHODS = {"none": [], "allreduce": ["gossip.method=allreduce"], "gossip": [],
              "gossip+overlap": ["gossip.overlap=true"], "sgp": ["gossip.method=sgp"]}  # fmt: skip
# model, images per peer, batch, epochs, H (quick), H (full): resnet50 steps are seconds long on a CPU
G1_WORKLOADS = [("cifar_cnn", 2000, 64, 2, (10,), (10, 50)), ("resnet50", 120, 8, 1, (), (5,))]
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
    from workers.peer.synthetic import write_tiny_cifar10

    rows = []
    for model, per_peer, batch, epochs, quick_h, full_h in G1_WORKLOADS:
        data_root = write_tiny_cifar10(Path(tempfile.mkdtemp(prefix="bench-cifar-")), n_train=4 * per_peer,
                                       n_test=min(500, 8 * batch))  # fmt: skip
        workload = [f"model.name={model}", f"data.batch_size={batch}", f"data.test_batch_size={8 * batch}",
                    f"optim.epochs={epochs}"]  # fmt: skip
        for every_steps in quick_h if quick else full_h:
            speeds = {}
            for method in G1_METHODS:
                result = run_experiment(cifar_config(data_root, method, every_steps, *workload), bench_dir / "g1")
                metrics = read_metrics(result.run_dir)
                speeds[method] = metrics.samples_per_s.mean()
                rows.append(dict(bench="G1", what=method, model=model, every_steps=every_steps,
                                 samples_per_s=speeds[method], ratio=speeds[method] / speeds["none"],
                                 rounds_ok=int(metrics.averaging_rounds_ok.max()),
                                 averaging_seconds=metrics.averaging_seconds.sum() / 4,
                                 run=result.run_dir.name))  # fmt: skip
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
            gloo = median_round(_gloo_rounds, group, megabytes)["seconds"]
            for codec in ("none", "float16", "uint8") if megabytes >= 10 or not quick else ("none",):
                hivemind = median_round(_hivemind_rounds, group, megabytes, codec)
                serialize_s = serialization_seconds(bench_tensor(megabytes), codec)  # here, alone
                rows.append(dict(bench="G2", what=f"{megabytes} MB, group of {group}", compression=codec, **hivemind,
                                 gloo_s=gloo, ratio=hivemind["seconds"] / gloo,
                                 allreduce_ratio=hivemind["allreduce_s"] / gloo, serialize_s=serialize_s))  # fmt: skip
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


def _hivemind_rounds(rank: int, group: int, megabytes: int, port: int, rendezvous, times, codec: str) -> None:
    """Each round in two phases: matchmaking (hivemind's step with require_trigger, until the group is assembled)
    and the all-reduce (after allow_allreduce); with the CPU this peer's processes spent on it."""
    import hivemind
    import psutil
    from hivemind.averaging.control import AveragingStage

    from workers.averaging.gossip import PART_SIZE_BYTES, compression, swarm_averager_class

    mp.set_start_method("fork", force=True)  # hivemind forks its DHT and averager processes (a spawned child spawns)
    initial = [] if rank == 0 else rendezvous.get(timeout=120)
    dht = hivemind.DHT(initial_peers=initial, host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    if rank == 0:
        for _ in range(group - 1):
            rendezvous.put([str(addr) for addr in dht.get_visible_maddrs()])
    tensor = bench_tensor(megabytes)
    averager = swarm_averager_class()([tensor], dht, prefix="bench", target_group_size=group, min_group_size=group,
                                      min_matchmaking_time=5.0, request_timeout=2.0, allreduce_timeout=120,
                                      compression=compression(codec), part_size_bytes=PART_SIZE_BYTES,
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
    for bench, columns in [("G1", ["what", "model", "every_steps", "samples_per_s", "ratio", "rounds_ok",
                                   "averaging_seconds"]),
                           ("G2", ["what", "compression", "seconds", "gloo_s", "ratio", "matchmaking_s", "allreduce_s",
                                   "allreduce_ratio", "averager_cpu_s", "p2pd_cpu_s", "serialize_s"]),
                           ("G7", ["what", "seconds", "bare_ray_s", "ratio"])]:  # fmt: skip
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
