"""`.venv/bin/python results/examples/bench/sgp-overlap-20261206/pushsum_alone.py [ROUNDS]`, from the project root:
the CPU of 4 in-process PushSum peers (cifar_cnn's parameters, synchronous rounds, no training) per peer-round, in
this process (every thread: the rounds, the p2pd clients' event loops) and in its children (the DHTs' processes,
p2pd), by process name."""

import sys
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import torch

sys.path.insert(0, ".")  # run from the project root
from tests.test_sgp import start_dhts  # noqa: E402
from workers.averaging.pushsum import PushSum  # noqa: E402
from workers.peer.models import CifarCNN  # noqa: E402

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 100
torch.set_num_threads(1)


def children_cpu() -> dict:
    me = psutil.Process()
    out = {}
    for child in me.children(recursive=True):
        try:
            t = child.cpu_times()
            out[(child.pid, child.name())] = t.user + t.system
        except psutil.Error:
            pass
    return out


dhts = start_dhts(4)
peers = []
for i, dht in enumerate(dhts):
    torch.manual_seed(i)
    model = CifarCNN(10)
    peers.append(PushSum(dht, "prof", [p.data for p in model.parameters()]))
for p in peers:
    p.join()
for p in peers:
    p.wait_members(4, timeout=20)
pool = ThreadPoolExecutor(4, thread_name_prefix="trainer")
list(pool.map(lambda p: p.round(0), peers))
before, children, wall = time.process_time(), children_cpu(), time.perf_counter()
for k in range(1, ROUNDS + 1):
    list(pool.map(lambda p, k=k: p.round(k), peers))
wall, mine = time.perf_counter() - wall, time.process_time() - before
spent = {}
for (pid, name), cpu in children_cpu().items():
    spent[name] = spent.get(name, 0.0) + cpu - children.get((pid, name), 0.0)
n = 4 * ROUNDS
print(f"{ROUNDS} rounds of 4 peers in {wall:.1f} s; ms of CPU per peer-round:")
print(f"  this process (the peers) {1000 * mine / n:7.2f}")
for name, cpu in sorted(spent.items(), key=lambda item: -item[1]):
    if cpu > 0:
        print(f"  process {name:17s} {1000 * cpu / n:7.2f}")
print("delivered:", [p.take_counts() for p in peers][0])
for p in peers:
    p.shutdown()
for d in dhts:
    d.shutdown()
