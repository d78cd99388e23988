"""The warning for a multi-node Ray cluster without token authentication: when it is given, and what it says."""

from __future__ import annotations

import pytest

from launcher.driver.ray_tokens import dashboard_auth_mode, token_auth_warning
from tests.cluster import free_ports


def test_one_node_gets_no_warning():
    assert token_auth_warning(1, {}, token_file_exists=False, cluster_mode="disabled") is None


def test_a_cluster_that_let_a_driver_in_without_a_token_is_named_a_risk():
    warning = token_auth_warning(3, {}, token_file_exists=False)
    assert warning.startswith("SECURITY: this 3-node Ray cluster does not require token authentication")
    assert "joined it without a token (RAY_AUTH_MODE=unset)" in warning
    assert "anyone who can reach its ports can run code on every node" in warning
    assert "join or poison the peers' swarm" in warning
    assert "`ray get-auth-token --generate`" in warning, "no token anywhere: making one is the first step"
    assert "restart Ray there with RAY_AUTH_MODE=token" in warning and "export RAY_AUTH_MODE=token" in warning
    assert "README: 'Token authentication'" in warning


@pytest.mark.parametrize(
    "env, token_file_exists",
    [({}, True), ({"RAY_AUTH_TOKEN": "abc"}, False), ({"RAY_AUTH_TOKEN_PATH": "/secrets/ray"}, False)],
)
def test_a_token_at_hand_is_not_generated_again(env, token_file_exists):
    warning = token_auth_warning(2, {**env, "RAY_AUTH_MODE": "disabled"}, token_file_exists)
    assert "RAY_AUTH_MODE=disabled" in warning and "--generate" not in warning


def test_a_driver_in_token_mode_is_trusted_unless_the_head_says_otherwise():
    token_env = {"RAY_AUTH_MODE": "TOKEN", "RAY_AUTH_TOKEN": "abc"}
    assert token_auth_warning(2, token_env, token_file_exists=False) is None
    assert token_auth_warning(2, token_env, token_file_exists=False, cluster_mode="token") is None
    # a cluster without token auth ignores the token a client sends: only the head's answer shows it
    warning = token_auth_warning(2, token_env, token_file_exists=False, cluster_mode="disabled")
    assert "its head says authentication_mode=disabled" in warning


def test_the_head_s_answer_wins_over_the_driver_s_mode():
    assert token_auth_warning(4, {}, token_file_exists=False, cluster_mode="token") is None


def test_no_dashboard_means_unknown():
    (port,) = free_ports(1)  # nothing listens there
    assert dashboard_auth_mode(f"127.0.0.1:{port}", timeout=1) is None
