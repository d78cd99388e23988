"""Whether the Ray cluster a run uses is open to anyone who can reach it, and the warning that says so.

What Ray 2.60 lets a driver know: its own mode (`RAY_AUTH_MODE`), and, from the head's dashboard, the cluster's
(`GET /api/authentication_mode`, public by design: the web page asks it before it asks for a token). A driver that
got in without token mode proves the cluster accepts anyone; a driver in token mode proves nothing by itself, since a
cluster without token authentication ignores the token a client sends.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Mapping, MutableMapping
from pathlib import Path

TOKEN_SOURCES = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")  # besides ~/.ray/auth_token


def token_auth_warning(
    node_count: int, env: Mapping[str, str], token_file_exists: bool, cluster_mode: str | None = None
) -> str | None:
    """The warning to log when a cluster of several nodes does not require a token; None when it is one node or
    requires one. `env`: the driver's environment after connecting; `token_file_exists`: ~/.ray/auth_token is
    there; `cluster_mode`: the head's own answer ("token" or "disabled", see `dashboard_auth_mode`), None if
    unknown, in which case a driver in token mode is taken at its word."""
    if node_count <= 1:
        return None  # one node: the peers meet on loopback (and a new local Ray has token auth on by default)
    driver_mode = env.get("RAY_AUTH_MODE", "").lower()
    if cluster_mode == "token" or (cluster_mode is None and driver_mode == "token"):
        return None
    evidence = (
        "its head says authentication_mode=disabled"
        if cluster_mode == "disabled"
        else f"this driver joined it without a token (RAY_AUTH_MODE={driver_mode or 'unset'})"
    )
    return (
        f"SECURITY: this {node_count}-node Ray cluster does not require token authentication ({evidence}): anyone "
        "who can reach its ports can run code on every node, read the run's data and checkpoints, and join or "
        f"poison the peers' swarm. Turn it on: {_how_to_enable(env, token_file_exists)} (README: 'Token "
        "authentication'; https://docs.ray.io/en/latest/ray-security/token-auth.html)"
    )


def _how_to_enable(env: Mapping[str, str], token_file_exists: bool) -> str:
    has_token = token_file_exists or any(env.get(name) for name in TOKEN_SOURCES)
    make_token = "" if has_token else "`ray get-auth-token --generate` (writes ~/.ray/auth_token), then "
    return (
        f"{make_token}put the token on every node (~/.ray/auth_token) and restart Ray there with RAY_AUTH_MODE=token "
        "(configs/cluster/*.yaml do this), and export RAY_AUTH_MODE=token where drivers and `ray job` run"
    )


def dashboard_auth_mode(dashboard_url: str, timeout: float = 3.0) -> str | None:
    """The cluster's own authentication mode as its head's dashboard reports it ("token" or "disabled"); None when
    the dashboard does not answer (not running, or not reachable from here)."""
    url = dashboard_url if "://" in dashboard_url else f"http://{dashboard_url}"
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/api/authentication_mode", timeout=timeout) as response:
            return json.loads(response.read()).get("authentication_mode")
    except (OSError, ValueError, AttributeError):
        return None


def enable_token_auth(env: MutableMapping[str, str]) -> None:
    """RAY_AUTH_MODE=token when a token is at hand and no mode is set. Ray turns token mode on by itself only for
    address "auto"; with RAY_ADDRESS (or an --address) set it does not, and an unauthenticated client retries
    forever against a cluster that requires the token."""
    has_token = any(env.get(name) for name in TOKEN_SOURCES) or (Path.home() / ".ray" / "auth_token").is_file()
    if "RAY_AUTH_MODE" not in env and has_token:
        env["RAY_AUTH_MODE"] = "token"
