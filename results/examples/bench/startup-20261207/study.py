"""G7 before and after the start-up levers, side by side: each repeat runs the bench's start-up measurement (8 peers,
the run against N torch-and-optimizer actors and N no-op actors, its own local Ray) once on each code tree, in turn.

    PYTHONPATH=. .venv/bin/python results/examples/bench/startup-20261207/study.py OUT BEFORE_TREE [REPEATS]

BEFORE_TREE: a checkout of the code before (git worktree add /tmp/before e08b44f). Writes OUT/g7.csv."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

ONE = """if True:
    import json, sys, ray
    from pathlib import Path
    import launcher.bench as bench
    ray.init(address="local", num_cpus=8, include_dashboard=False, logging_level="WARNING")
    bench_startup = bench.startup
    try:
        import inspect
        peers_8 = lambda rows: [row for row in rows if row["what"] == "8 peers"]
        if "repeats" in inspect.signature(bench_startup).parameters:
            rows = bench_startup(Path(sys.argv[1]), quick=False, repeats=1)
        else:
            rows = bench_startup(Path(sys.argv[1]), quick=False)
        print("ROW " + json.dumps(peers_8(rows)[0], default=float))
    finally:
        ray.shutdown()
"""


def main(out: Path, before: Path, repeats: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for repeat in range(repeats):
        order = [("before", before), ("after", Path.cwd())]
        for arm, tree in order if repeat % 2 == 0 else order[::-1]:
            env = {**os.environ, "PYTHONPATH": str(tree)}
            done = subprocess.run([sys.executable, "-c", ONE, str(out / arm)], cwd=tree, env=env, text=True,
                                  capture_output=True, timeout=900)  # fmt: skip
            row = [line for line in done.stdout.splitlines() if line.startswith("ROW ")]
            if not row:
                raise RuntimeError(done.stderr[-3000:])
            rows.append(dict(arm=arm, repeat=repeat, **json.loads(row[0][4:])))
            print(arm, repeat, {k: rows[-1][k] for k in ("seconds", "torch_actors_s", "ratio")}, flush=True)
    table = pd.DataFrame(rows)
    table.to_csv(out / "g7.csv", index=False)
    print(table.groupby("arm")[["seconds", "torch_actors_s", "ratio", "bare_ratio"]].agg(["median", "min", "max"]))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 3)
