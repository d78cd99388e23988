"""Idle CPU of 4 SGP peers' liveness records (no training, no rounds, no Ray), per peer and second, by process kind:
no records, full DHT stores and reads, lean ones (stored straight to every node, read locally) renewed every ttl/3
and every ttl/2; interleaved, fresh PushSums for each. Usage: idle_liveness.py SECONDS_PER_WINDOW REPEATS"""

import sys
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))
from workers.averaging.levers import Levers, start_dht
from workers.averaging.liveness import LiveSet
from workers.averaging.pushsum import PushSum

N, T, R = 4, float(sys.argv[1]), int(sys.argv[2])
me = psutil.Process()


def cpu():
    out = {}
    for p in me.children(recursive=True):
        try:
            t = p.cpu_times()
            name = "p2pd" if "p2pd" in p.name() else "py"
            out[name] = out.get(name, 0.0) + t.user + t.system
        except psutil.Error:
            pass
    t = me.cpu_times()
    out["main"] = t.user + t.system
    return out


def window(label):
    time.sleep(2.0)
    a = cpu()
    time.sleep(T)
    b = cpu()
    d = {k: round(1e3 * (b.get(k, 0) - a.get(k, 0)) / T / N, 2) for k in b}
    print(label, d, "total", round(sum(d.values()), 2), "ms CPU per s per peer", flush=True)


dhts = []
for _ in range(N):
    initial = dhts[0].get_visible_maddrs() if dhts else []
    dhts.append(start_dht(Levers(), None, initial_peers=initial, host_maddrs=["/ip4/127.0.0.1/tcp/0"]))
variants = {"none": None, "full/3": (False, 3), "lean/3": (True, 3), "lean/2": (True, 2)}
for r in range(R):
    for name, v in variants.items():
        if v is None:
            window(name)
            continue
        LiveSet.publishes_per_ttl = v[1]
        peers = [PushSum(d, f"idle{r}{name}", [torch.zeros(1000)], lean_dht=v[0]) for d in dhts]
        for p in peers:
            p.live.peers, p.live.dht_nodes = N, N
        for p in peers:
            p.join(expected=1)
        for p in peers:
            p.wait_members(N, 10)
        window(name)
        print("  members", [len(p.members()) for p in peers], flush=True)
        for p in peers:
            p.shutdown()
for d in dhts:
    d.shutdown()
