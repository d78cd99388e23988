"""The #22 study on the final code: C and G1 at 4 peers (5 repeats), 8 peers, and H = 50, side by side."""

import logging
import sys
from pathlib import Path

import pandas as pd

from launcher.bench import cost_runs, round_cost_summary

logging.basicConfig(level=logging.INFO)
out = Path(sys.argv[1])
part = sys.argv[2]
pd.set_option("display.width", 250)
pd.set_option("display.max_columns", 30)
if part == "4":
    runs = cost_runs(out / "p4h10", ["none", "gossip", "gossip (hivemind sticky)", "allreduce"], 5)
elif part == "8":
    runs = cost_runs(out / "p8h10", ["none", "gossip", "allreduce"], int(sys.argv[3]), peers=8, epochs=8)
else:
    runs = cost_runs(out / "p4h50", ["none", "gossip", "allreduce"], int(sys.argv[3]), every_steps=50)
s = round_cost_summary(runs)
s.to_csv(out / f"summary_{part}.csv", index=False)
print(s.T)
