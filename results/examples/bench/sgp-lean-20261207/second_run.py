"""Stop 32's second run of bench C on the final code (4 peers, cifar_cnn, H = 10): none, sgp and allreduce
interleaved, 6 repeats. Usage: second_run.py OUT_DIR"""

import logging
import sys
from pathlib import Path

import pandas as pd

from launcher.bench import cost_runs, round_cost_summary

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
out = Path(sys.argv[1])
runs = cost_runs(out, ["none", "sgp", "allreduce"], repeats=6)
pd.set_option("display.width", 250)
summary = round_cost_summary(runs)
summary.round(4).to_csv(out / "summary.csv", index=False)
print(summary.round(4).to_string())
