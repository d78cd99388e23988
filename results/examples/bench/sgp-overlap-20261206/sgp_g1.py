"""C and G1 for sgp (blocking and overlapped) against all-reduce, 4 peers, cifar_cnn, H = 10: the bench's round_cost
with its arms reduced to these, interleaved with none."""

import logging
import sys
from pathlib import Path

import pandas as pd

from launcher.bench import cost_runs, round_cost_summary

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
out = Path(sys.argv[1])
runs = cost_runs(out, ["none", "sgp", "sgp (overlap)", "allreduce"], repeats=int(sys.argv[2]))
summary = round_cost_summary(runs)
summary.to_csv(out / "summary.csv", index=False)
pd.set_option("display.width", 250)
print(summary.round(4).to_string())
