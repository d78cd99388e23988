"""The generated parts of docs/ match the code they are generated from; the README stays a page a newcomer reads, and
every page it moved to docs/ is reachable from it."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import ROOT


def test_the_config_reference_and_the_metrics_columns_are_not_stale():
    done = subprocess.run([sys.executable, "docs/generate.py", "--check"], cwd=ROOT, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT)})  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_every_config_key_and_every_column_is_documented():
    config, metrics = (ROOT / "docs" / "config.md").read_text(), (ROOT / "docs" / "metrics.md").read_text()
    from workers.core.config import ExperimentConfig
    from workers.core.metrics import CSV_COLUMNS

    assert all(f"| `{column}` |" in metrics for column in CSV_COLUMNS)
    assert all(
        f"| `{name}` |" in config
        for name in ExperimentConfig.model_fields
        if name not in ("data", "model", "optim", "gossip", "resources", "network", "emulation", "metrics", "faults")
    )
    assert "|  |" not in config.split("<!-- generated: start -->")[1], "a config key without a description"


def test_the_readme_is_short_and_links_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    linked = set(re.findall(r"\(docs/([\w-]+\.md)", readme))
    pages = {path.name for path in (ROOT / "docs").glob("*.md")}
    assert pages <= linked, f"not linked from the README: {sorted(pages - linked)}"
