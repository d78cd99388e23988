"""Where sgp's c goes in a training run: the bench's C (4 peers, cifar_cnn, H = 10) with a third arm, sgp with
every_steps past the run's end (the config counts CIFAR-10's 50,000 images, the bench writes 8,000: no round comes,
measured): its processes, liveness records and state sharer, no exchange. Its CPU over
none's, per peer-round of the sgp arm of the same repeat, is the part of sgp's c that does not depend on rounds.
Usage: sgp_background.py OUT_DIR REPEATS [METHOD ...] (more of the bench's methods beside sgp, e.g. allreduce: stop
32's sgp-lean-20261207 ran it with allreduce)."""

import logging
import sys
from pathlib import Path

import pandas as pd

from launcher import bench
from launcher.bench import cifar_data, cost_runs, excess_ms, round_cost_summary
from workers.core.config import load_config, steps_per_epoch

EPOCHS = 16
DATA = cifar_data()
cfg = load_config(bench.CIFAR, [f"data.root={DATA}", "data.verify_checksums=false", "peers=4"])
LAST = steps_per_epoch(cfg.data, 4) * EPOCHS  # the last step by the config's count: past the run's 500
bench.METHODS["sgp (no rounds)"] = ["gossip.method=sgp", f"gossip.every_steps={LAST}"]
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
out = Path(sys.argv[1])
methods = ["none", "sgp", *sys.argv[3:], "sgp (no rounds)"]
runs = cost_runs(out, methods, repeats=int(sys.argv[2]), data_root=DATA, epochs=EPOCHS)
pd.set_option("display.width", 250)
print(round_cost_summary(runs[runs.what != "sgp (no rounds)"]).round(4).to_string())
none = runs[runs.what == "none"].set_index("repeat")
sgp = runs[runs.what == "sgp"].set_index("repeat")
idle = runs[runs.what == "sgp (no rounds)"].set_index("repeat")
rounds = sgp.rounds_ok + sgp.rounds_failed
cols = ["cpu_s"] + [c for c in runs.columns if c.startswith("cpu_s_")]
arms = {"sgp": sgp, "no rounds": idle}
table = pd.DataFrame({f"{c} {name}": excess_ms(arm, none, c, rounds) for name, arm in arms.items() for c in cols})
table["rounds"] = rounds
table["idle rounds"] = idle.rounds_ok + idle.rounds_failed
table.loc["median"] = table.median()
table.T.round(2).to_csv(out / "background.csv")
print(table.T.round(2).to_string())
