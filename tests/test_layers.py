"""The architecture as a tested contract. `launcher` (the driver, the results, the CLI) sits above `workers` (what runs
in a peer); inside `workers`, `core` (the config, the protocol, storage, csv, reporting) sits below `peer` and
`averaging`. No module imports one above it, and no import circle exists, counting the imports inside functions too
(a lazy import must not hide a circle). And the driver's process and `analyze` never load torch or hivemind: checked
on a real quickstart run, not only on importing the CLI."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import QUICKSTART, ROOT

PACKAGES = ("launcher", "workers")
HEAVY = ("torch", "torchvision", "hivemind")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The project modules `path` imports at run time (anywhere in it, but not under `if TYPE_CHECKING:`)."""
    tree, found = ast.parse(path.read_text()), set()
    type_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If) and "TYPE_CHECKING" in
                 ast.unparse(block.test) for node in ast.walk(block)}  # fmt: skip
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        found |= {name for name in names if name in known}
    return found


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(path, set(found)) - {name} for name, path in found.items()}


def test_no_module_imports_a_layer_above_it():
    def layer(module: str) -> int:
        if module.startswith("launcher"):
            return 2
        return 0 if module.startswith("workers.core") else 1

    wrong = [(module, used) for module, uses in graph().items() for used in uses if layer(used) > layer(module)]
    assert wrong == [], "launcher above workers, workers.core below workers.peer and workers.averaging"


def test_no_import_circle_not_even_through_a_lazy_import():
    edges, circles = graph(), []
    index, low, stack, on_stack, counter = {}, {}, [], set(), [0]

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in edges:
        if node not in index:
            visit(node)
    assert circles == []


def test_the_circle_check_sees_a_lazy_import(tmp_path):
    """The check reads imports inside functions: a circle hidden behind one is found."""
    (tmp_path / "a.py").write_text("import workers.core.config\n")
    (tmp_path / "b.py").write_text("def f():\n    import launcher.cli\n")
    assert imports_of(tmp_path / "b.py", {"launcher.cli"}) == {"launcher.cli"}


SPY = f"""
import sys
from launcher.cli import main
code = main(sys.argv[1:])
heavy = sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))
print('HEAVY', heavy)
sys.exit(code)
"""


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_the_driver_of_a_real_run_and_analyze_load_no_torch(tmp_path, private_ray_env):
    """A quickstart run (its TensorBoard sink and the peers' actor class included) and `analyze --plot` of it."""
    run = [sys.executable, "-c", SPY, "run", str(QUICKSTART), "--peers", "2", "--set", "optim.epochs=2", "--out",
           str(tmp_path)]  # fmt: skip
    done = subprocess.run(run, cwd=ROOT, env=private_ray_env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "HEAVY []" in done.stdout, done.stdout[-500:]
    (run_dir,) = tmp_path.iterdir()
    assert (run_dir / "tensorboard" / "swarm").is_dir()
    analyze = [sys.executable, "-c", SPY, "analyze", str(run_dir), "--plot"]
    done = subprocess.run(analyze, cwd=ROOT, env=private_ray_env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "HEAVY []" in done.stdout, done.stdout[-500:] + done.stderr[-2000:]
