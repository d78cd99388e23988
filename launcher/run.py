"""`gossip-launch run` as a plain script, for `ray submit` (which copies this file to ~/run.py on the head node and
runs `python ~/run.py ARGS` from the home folder):

    ray submit configs/cluster/aws-gpu.yaml launcher/run.py -- configs/experiments/cifar10_gossip.yaml --peers 8

`run.py CONFIG [options]` is `gossip-launch run CONFIG [options] --address auto --out ~/gossip-launcher/results`:
it joins the Ray cluster of the machine it runs on and writes results where `ray rsync-down` fetches them
(`--address` and `--out`/`--storage` given on the command line win; a `storage:` in the config does not: give
`--storage s3://...` here). A relative CONFIG that is not found from the current folder
is looked up in the repository. The package is imported from the Python environment if it is installed there,
else from the repository this file sits in, else from ~/gossip-launcher, where the cluster YAMLs mount it.
"""

from __future__ import annotations

import sys
from pathlib import Path

MOUNTED_PROJECT = "~/gossip-launcher"  # file_mounts target in configs/cluster/*.yaml
DEFAULT_OUT = f"{MOUNTED_PROJECT}/results"  # what the README's `ray rsync-down` fetches


def project_dirs() -> list[Path]:
    """Where the repository may be: around this file (a checkout), or where the cluster YAMLs mount it."""
    return [Path(__file__).resolve().parent.parent, Path(MOUNTED_PROJECT).expanduser()]


def import_cli(projects: list[Path]):
    """`launcher.cli.main`, from the installed package or else from the first project folder that has it."""
    here = Path(__file__).resolve().parent  # `launcher/` itself in a checkout: its modules are no top-level names
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    try:
        from launcher.cli import main
    except ImportError as err:
        found = [p for p in projects if (p / "launcher" / "cli.py").is_file()]
        if not found:
            where = " or ".join(str(p) for p in projects)
            raise SystemExit(f"run.py: {err}: install the project (pip install -e .) or put it in {where}") from None
        sys.path.insert(0, str(found[0]))
        from launcher.cli import main
    return main


def config_index(args: list[str]) -> int | None:
    """Index of CONFIG, the one positional argument of `gossip-launch run` (every option of it takes one value)."""
    i = 0
    while i < len(args):
        if not args[i].startswith("-"):
            return i
        i += 1 if "=" in args[i] or args[i] in ("-h", "--help") else 2
    return None


def submit_args(args: list[str], cwd: Path, projects: list[Path]) -> list[str]:
    """`CONFIG [options]` -> `run CONFIG [options] --address auto --out DEFAULT_OUT` (each default only when the
    option is not given), with a relative CONFIG that does not exist under `cwd` taken from the first project
    folder that has it."""
    args = list(args)
    index = config_index(args)
    if index is not None and not (cwd / args[index]).exists():
        found = [p / args[index] for p in projects if (p / args[index]).exists()]
        args[index] = str(found[0]) if found else args[index]
    defaults = (("--address",), "auto"), (("--out", "--storage"), str(Path(DEFAULT_OUT).expanduser()))
    for options, default in defaults:  # --storage is --out under another name
        if not any(a == option or a.startswith(option + "=") for a in args for option in options):
            args += [options[0], default]
    return ["run", *args]


def main(argv: list[str] | None = None) -> int:
    projects = project_dirs()
    cli_main = import_cli(projects)
    return cli_main(submit_args(sys.argv[1:] if argv is None else argv, Path.cwd(), projects))


if __name__ == "__main__":
    sys.exit(main())
