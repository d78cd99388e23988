"""Where peers run and how they reach each other: placement bundles, the fail-fast check, listen/announce addresses.
Pure functions; the multi-node runs are in test_multinode.py and test_netns.py."""

from __future__ import annotations

import ipaddress

import pytest

from launcher.driver.placement import PlacementError, check_placeable, peer_bundles, placement_strategy, resolve_network
from tests.conftest import quick_config
from workers.core.config import NetworkConfig
from workers.core.errors import ConfigError
from workers.core.network import announce_host, dht_maddrs, node_ip

CPU_NODE = {"CPU": 8.0, "memory": 1e10, "node:10.0.0.2": 1.0}
GPU_NODE = {"CPU": 16.0, "GPU": 1.0, "node:10.0.0.3": 1.0}


def test_bundles_carry_cpus_gpus_and_custom_resources_per_peer():
    cfg = quick_config(
        "peers=2", "resources.num_cpus=2", "resources.num_gpus=0.5", "resources.custom={fast_disk: 1}",
        "resources.peer_custom=[{node_a: 1}, {node_b: 1}]",
    )  # fmt: skip
    assert peer_bundles(cfg) == [
        {"CPU": 2.0, "GPU": 0.5, "fast_disk": 1.0, "node_a": 1.0},
        {"CPU": 2.0, "GPU": 0.5, "fast_disk": 1.0, "node_b": 1.0},
    ]
    assert peer_bundles(quick_config("peers=2")) == [{"CPU": 0.5}] * 2  # no GPU key on CPU runs


def test_gpus_on_a_cpu_only_cluster_fail_at_once_naming_the_resource():
    with pytest.raises(PlacementError, match=r"peer 0 needs CPU=1, GPU=1 .* no node of the cluster has GPU=1"):
        check_placeable([{"CPU": 1.0, "GPU": 1.0}] * 2, "SPREAD", [CPU_NODE, CPU_NODE])


def test_a_custom_resource_no_node_has_is_named():
    with pytest.raises(PlacementError, match="no node of the cluster has node_c=1"):
        check_placeable([{"CPU": 1.0, "node_c": 1.0}], "SPREAD", [CPU_NODE, {**CPU_NODE, "node_a": 1.0}])


def test_a_bundle_must_fit_on_one_node_not_on_the_sum_of_nodes():
    with pytest.raises(PlacementError, match="peer 0 needs CPU=12"):
        check_placeable([{"CPU": 12.0}], "SPREAD", [CPU_NODE, CPU_NODE])


def test_what_fits_passes_including_gpu_fractions_packed_on_one_gpu():
    check_placeable([{"CPU": 1.0, "GPU": 0.25}] * 4, "PACK", [CPU_NODE, GPU_NODE])
    check_placeable([{"CPU": 4.0}] * 2, "STRICT_PACK", [CPU_NODE])


def test_strict_strategies_are_checked_against_the_whole_group():
    with pytest.raises(PlacementError, match="STRICT_PACK needs CPU=12"):
        check_placeable([{"CPU": 4.0}] * 3, "STRICT_PACK", [CPU_NODE, CPU_NODE])
    with pytest.raises(PlacementError, match="STRICT_SPREAD needs 3 nodes that can hold a peer, the cluster has 2"):
        check_placeable([{"CPU": 1.0}] * 3, "STRICT_SPREAD", [CPU_NODE, GPU_NODE])
    with pytest.raises(PlacementError, match="STRICT_SPREAD needs 2 nodes that can hold a peer, the cluster has 1"):
        check_placeable([{"CPU": 1.0, "GPU": 0.5}] * 2, "STRICT_SPREAD", [CPU_NODE, GPU_NODE])  # one has a GPU


def test_more_than_the_whole_cluster_has_fails_at_once():
    with pytest.raises(PlacementError, match=r"3 peers need CPU=3, GPU=3 in all, the cluster has CPU=24, GPU=1"):
        check_placeable([{"CPU": 1.0, "GPU": 1.0}] * 3, "SPREAD", [CPU_NODE, GPU_NODE])


def test_peers_that_share_gpus_are_packed_by_default():
    assert placement_strategy(quick_config("resources.num_gpus=0.25")) == "PACK"
    assert placement_strategy(quick_config("resources.num_gpus=1")) == "SPREAD"
    assert placement_strategy(quick_config()) == "SPREAD"
    assert placement_strategy(quick_config("resources.num_gpus=0.5", "resources.placement=SPREAD")) == "SPREAD"


@pytest.mark.parametrize(
    "override, message",
    [
        ("resources.peer_custom=[{node_a: 1}]", "resources.peer_custom has 1 entries but peers=4"),
        ("resources.placement=RANDOM", "resources.placement"),
        ("network.host=localhost", "network.host='localhost': expected an IPv4 address"),
        ("network.host=10.0.0.300", "network.host"),
        ("network.announce_host=0.0.0.0", "network.announce_host='0.0.0.0': 0.0.0.0 is where to listen"),
        ("network.port=65534", "network.port=65534 \\+ peers=4 is past 65535"),
        ("resources.custom={node_a: -1}", "resources.custom"),
        ("resources.custom={CPU: 4}", "CPU: set resources.num_cpus / num_gpus instead"),
        ("resources.peer_custom=[{a: 1}, {GPU: 1}, {b: 1}, {c: 1}]", "GPU: set resources.num_cpus"),
        ("resources.num_gpus=1.5", "a fraction of one GPU or a whole number"),
    ],
)
def test_bad_placement_and_network_settings_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        quick_config(override)


def test_a_fixed_port_gives_each_peer_its_own_and_announces_the_given_host():
    network = NetworkConfig(host="0.0.0.0", announce_host="10.1.2.3", port=40000)
    assert dht_maddrs(network, 3) == (["/ip4/0.0.0.0/tcp/40003"], ["/ip4/10.1.2.3/tcp/40003"])


def test_loopback_announces_loopback_and_any_free_port():
    (listen,), (announce,) = dht_maddrs(NetworkConfig(host="auto"))
    assert listen.startswith("/ip4/127.0.0.1/tcp/") and announce == listen and not listen.endswith("/tcp/0")


def test_listening_on_all_interfaces_announces_this_nodes_ip_not_loopback():
    ip = announce_host(NetworkConfig(host="0.0.0.0"))
    assert ip == node_ip()
    if ip != "127.0.0.1":  # a machine with a non-loopback interface (any cluster node)
        assert not ipaddress.ip_address(ip).is_loopback


def test_auto_host_is_loopback_on_one_node_and_all_interfaces_across_nodes():
    assert resolve_network(quick_config(), nodes=1).network.host == "127.0.0.1"
    assert resolve_network(quick_config(), nodes=3).network.host == "0.0.0.0"
    assert resolve_network(quick_config("network.host=0.0.0.0"), nodes=1).network.host == "0.0.0.0"


@pytest.mark.parametrize("override", ["network.host=127.0.0.1", "network.announce_host=10.0.0.9"])
def test_one_machines_address_cannot_serve_peers_on_several_nodes(override):
    with pytest.raises(PlacementError, match="is one machine's address, but the peers were placed on 2 nodes"):
        resolve_network(quick_config(override), nodes=2)
    resolve_network(quick_config(override), nodes=1)  # fine on one node
