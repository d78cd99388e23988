"""4 gossip peers in this process (like tests/test_sticky.py), N sticky rounds; CPU per process kind per peer-round."""

import sys
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import torch
from torch import nn

sys.path.insert(0, ".")
from tests.conftest import *  # noqa
from workers.averaging.gossip import GossipAveraging
from workers.averaging.levers import Levers, start_dht
from workers.core.config import GossipConfig


def main(transport, rounds=200, n=4):
    cfg = GossipConfig(group_size=16, matchmaking_time=2.0, round_timeout=20.0)
    levers = Levers(gloo=transport == "gloo")
    dhts = [start_dht(levers, None, host_maddrs=["/ip4/127.0.0.1/tcp/0"])]
    for _ in range(n - 1):
        dhts.append(
            start_dht(levers, None, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=dhts[0].get_visible_maddrs())
        )
    torch.manual_seed(0)

    peers = []
    for d in dhts:
        model = nn.Sequential(*[nn.Linear(256, 245) for _ in range(4)])  # ~0.25 MB
        peers.append(GossipAveraging(model, d, cfg, "p", levers=levers))
    for p in peers:
        p.set_swarm_size(n, n)
    pool = ThreadPoolExecutor(n)
    for _ in range(5):
        list(pool.map(lambda p: p.average(), peers))
    me = psutil.Process()
    avg = {p.averager.pid for p in peers}
    {c.pid: c for c in me.children(recursive=True)}

    def cpu():
        out = {"host": sum(me.cpu_times()[:2])}
        for c in me.children(recursive=True):
            try:
                t = c.cpu_times()
                name = c.name()
                kind = "p2pd" if "p2pd" in name else "averager" if c.pid in avg else "dht"
                out[kind] = out.get(kind, 0) + t.user + t.system
            except psutil.Error:
                pass
        return out

    a = cpu()
    t0 = time.perf_counter()
    sizes = [list(pool.map(lambda p: p.average(), peers)) for _ in range(rounds)]
    b = cpu()
    wall = time.perf_counter() - t0
    print(
        transport,
        {k: round((b[k] - a.get(k, 0)) * 1000 / rounds / n, 2) for k in b},
        "wall/round ms",
        round(wall * 1000 / rounds, 1),
        "ok",
        sum(s is not None for r in sizes for s in r),
        [(p.gloo is not None and p.gloo.group is not None) for p in peers],
    )
    if len(sys.argv) > 2:
        print("averager pids", [p.averager.pid for p in peers])
        sys.stdout.flush()
        import subprocess

        prof = subprocess.Popen(
            [
                ".venv/bin/py-spy",
                "record",
                "-p",
                str(peers[0].averager.pid),
                "-o",
                "/tmp/c1/prof.txt",
                "-f",
                "raw",
                "-d",
                "8",
                "-r",
                "200",
            ]
        )
        t1 = time.time()
        while time.time() - t1 < 9:
            list(pool.map(lambda p: p.average(), peers))
        prof.wait()
    for p in peers:
        p.shutdown()
    for d in dhts:
        d.shutdown()


main(sys.argv[1])
