"""configs/cluster/*.yaml pass the checks `ray up` runs before it touches a machine, install the project with the
pinned versions and keep Ray's token authentication on; launcher/run.py works as the plain script `ray submit` runs.
Pure: no cloud, no Ray cluster."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pydantic
import pytest
import yaml
from ray._private.authentication.authentication_token_setup import _get_default_token_path
from ray.autoscaler._private.commands import _bootstrap_config
from ray.autoscaler._private.util import prepare_config, validate_config

from launcher import run
from launcher.cli import build_parser
from launcher.driver.ray_tokens import enable_token_auth

REPO = Path(__file__).resolve().parent.parent
CLUSTER_CONFIGS = sorted((REPO / "configs" / "cluster").glob("*.yaml"))
RUN_PY = REPO / "launcher" / "run.py"
TOKEN_MOUNT = "~/" + str(_get_default_token_path().relative_to(Path.home()))  # where Ray looks for the token


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def all_commands(config: dict) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands")
    node_types = config.get("available_node_types", {}).values()
    return [c for key in keys for c in config.get(key, [])] + [
        c for node in node_types for key in keys for c in node.get(key, [])
    ]


def constraints() -> dict[str, str]:
    pins = [line.split("#")[0].strip() for line in (REPO / "constraints.txt").read_text().splitlines()]
    return {name.lower(): version for name, _, version in (p.partition("==") for p in pins if "==" in p)}


def test_a_cloud_and_an_onprem_cluster():
    assert {load(p)["provider"]["type"] for p in CLUSTER_CONFIGS} >= {"aws", "local"}


@pytest.mark.parametrize("path", CLUSTER_CONFIGS, ids=lambda p: p.name)
def test_ray_accepts_the_cluster_config(path):
    """`ray up`'s own steps: the provider's defaults merged in (`prepare_config`), then the schema and node-type
    checks (`validate_config`). The local provider needs no cloud, so it goes through all of `_bootstrap_config`."""
    config = prepare_config(load(path))
    validate_config(config)
    if config["provider"]["type"] == "local":
        _bootstrap_config(load(path), no_config_cache=True)


@pytest.mark.parametrize("path", CLUSTER_CONFIGS, ids=lambda p: p.name)
def test_ray_validation_would_catch_a_mistake(path):
    config = prepare_config(load(path))
    config["setup_comands"] = config.pop("setup_commands")  # a misspelled key
    with pytest.raises(jsonschema.ValidationError):
        validate_config(config)


@pytest.mark.parametrize("path", CLUSTER_CONFIGS, ids=lambda p: p.name)
def test_file_mounts_put_the_project_and_the_token_on_every_node(path):
    mounts = load(path)["file_mounts"]
    for remote, local in mounts.items():
        if remote == TOKEN_MOUNT:
            assert local == TOKEN_MOUNT  # the user's token, made by `ray get-auth-token --generate`
        else:
            assert (REPO / local).exists(), f"{path.name}: file_mounts {remote}: {local} is not in the repository"
    assert mounts[run.MOUNTED_PROJECT] == ".", "run.py looks for the project where the YAMLs mount the repository"
    assert ".gitignore" in load(path)["rsync_filter"]  # .venv/, data/, results/ are not copied to the nodes


@pytest.mark.parametrize("path", CLUSTER_CONFIGS, ids=lambda p: p.name)
def test_setup_installs_the_project_with_the_pinned_versions(path):
    commands = all_commands(load(path))
    project = run.MOUNTED_PROJECT
    assert any(f"-c {project}/constraints.txt" in c and f"-e {project}" in c for c in commands), commands
    pins = constraints()
    for name, version in re.findall(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([0-9][^\s'\"]*)", " ".join(commands)):
        assert pins.get(name.lower()) == version, f"{path.name}: {name}=={version} but constraints.txt has {pins}"


@pytest.mark.parametrize("path", CLUSTER_CONFIGS, ids=lambda p: p.name)
def test_every_ray_start_uses_token_auth(path):
    config = load(path)
    starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in config[key]]
    assert sum("ray start" in c for c in starts) == 2
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert "RAY_AUTH_MODE=disabled" not in yaml.safe_dump(config)


# launcher/run.py


def test_run_py_help_from_another_folder(tmp_path):
    result = subprocess.run([sys.executable, str(RUN_PY), "--help"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "usage: gossip-launch run" in result.stdout and "--address" in result.stdout


def run_copied_script(home: Path) -> subprocess.CompletedProcess:
    """Run run.py the way `ray submit` does (copied to ~/run.py, from ~) with the packages of this environment
    but without the project installed: `-S` skips the .pth file of the editable install."""
    shutil.copy(RUN_PY, home / "run.py")
    site_packages = Path(pydantic.__file__).parent.parent
    code = f"import sys, runpy; sys.path.append({str(site_packages)!r}); runpy.run_path('run.py', run_name='__main__')"
    return subprocess.run([sys.executable, "-S", "-c", code, "--help"], cwd=home, env={"HOME": str(home)},
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_run_py_finds_the_mounted_project_when_it_is_not_installed(tmp_path):
    (tmp_path / "gossip-launcher").symlink_to(REPO)
    result = run_copied_script(tmp_path)
    assert result.returncode == 0, result.stderr
    assert "usage: gossip-launch run" in result.stdout


def test_run_py_without_the_project_says_where_it_looked(tmp_path):
    result = run_copied_script(tmp_path)
    assert result.returncode == 1
    assert "No module named 'launcher'" in result.stderr and str(tmp_path / "gossip-launcher") in result.stderr


@pytest.fixture
def project(tmp_path) -> Path:
    config = tmp_path / "repo" / "configs" / "experiments" / "quickstart.yaml"
    config.parent.mkdir(parents=True)
    config.write_text("peers: 2\n")
    (tmp_path / "home").mkdir()
    return tmp_path / "repo"


def test_submit_args_are_gossip_launch_run_with_cluster_defaults(project):
    args = run.submit_args(["configs/experiments/quickstart.yaml", "--peers", "8"], project.parent / "home", [project])
    parsed = build_parser().parse_args(args)
    assert parsed.command == "run" and parsed.peers == 8
    assert parsed.config == project / "configs/experiments/quickstart.yaml"  # not under ~: found in the repository
    assert parsed.address == "auto"
    assert parsed.out == Path(run.DEFAULT_OUT).expanduser() and parsed.out.is_absolute()


def test_submit_args_keep_what_the_user_gave(project):
    cwd = project  # the config exists relative to the current folder: left as it is
    given = ["--set", "gossip.alpha=0.5", "configs/experiments/quickstart.yaml", "--address=10.0.0.1:6379"]
    args = run.submit_args([*given, "--out", "/data/results"], cwd, [project.parent / "elsewhere"])
    assert args == ["run", *given, "--out", "/data/results"]


def test_submit_args_leave_an_unknown_config_for_the_cli_to_report(project):
    args = run.submit_args(["missing.yaml"], project.parent / "home", [project])
    assert args[:2] == ["run", "missing.yaml"]


def test_default_out_is_in_the_mounted_project():
    assert run.DEFAULT_OUT.startswith(run.MOUNTED_PROJECT + "/")


@pytest.mark.parametrize(
    ("env", "token_file", "mode"),
    [({}, False, None), ({}, True, "token"), ({"RAY_AUTH_TOKEN": "abc"}, False, "token"),
     ({"RAY_AUTH_MODE": "disabled"}, True, "disabled")],
)  # fmt: skip
def test_token_mode_when_a_token_is_at_hand(tmp_path, monkeypatch, env, token_file, mode):
    monkeypatch.setenv("HOME", str(tmp_path))
    if token_file:
        (tmp_path / ".ray").mkdir()
        (tmp_path / ".ray" / "auth_token").write_text("secret")
    env = dict(env)
    enable_token_auth(env)
    assert env.get("RAY_AUTH_MODE") == mode
