"""Two standalone peers on two "machines": network namespaces joined by a veth pair, with no loopback between them.

On one machine every peer can reach every other over 127.0.0.1, which hides a peer announcing an address the others
cannot dial. Here each peer has its own network stack, listens on 0.0.0.0 and must announce its namespace's IP.
Needs root and iproute2 (`ip netns`, veth); skipped where the machine does not allow it.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import subprocess
import sys

import pandas as pd
import pytest

from tests.conftest import ROOT
from tests.test_standalone import PeerProcesses, leftovers, logged_maddrs, logs, read_visible_maddrs

SUBNET = "10.213.0"  # private, unlikely to clash with the host's routes (and each namespace has only its own)
EPOCHS = 2
SWARM = ["--peers", "2", "--epochs", str(EPOCHS), "--set", "gossip.matchmaking_time=1.5"]
FIXED_PORT = 31337  # free for sure: nothing else listens in a fresh namespace


def ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


@pytest.fixture
def namespaces():
    """[(name, IP), (name, IP)]: two fresh network namespaces with lo up, joined by a veth pair on SUBNET.0/24 and
    without a default route. Deleted at teardown whatever happened (their veth ends go with them)."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("`ip` (iproute2) is not installed")
    suffix = secrets.token_hex(3)
    names, veths = (f"gl-a-{suffix}", f"gl-b-{suffix}"), (f"gla{suffix}", f"glb{suffix}")  # ifnames: 15 chars max
    addresses = (f"{SUBNET}.1", f"{SUBNET}.2")
    setup = [["netns", "add", names[0]], ["netns", "add", names[1]], ["netns", "exec", names[0], "true"],
             ["link", "add", veths[0], "type", "veth", "peer", "name", veths[1]]]  # fmt: skip
    for name, veth, address in zip(names, veths, addresses, strict=True):
        setup += [["link", "set", veth, "netns", name], ["-n", name, "addr", "add", f"{address}/24", "dev", veth],
                  ["-n", name, "link", "set", veth, "up"], ["-n", name, "link", "set", "lo", "up"]]  # fmt: skip
    try:
        for command in setup:
            done = ip(*command)
            if done.returncode != 0:
                pytest.skip(f"cannot set up network namespaces: `ip {' '.join(command)}`: {done.stderr.strip()}")
        yield list(zip(names, addresses, strict=True))
    finally:
        for name in names:
            ip("netns", "del", name)
        ip("link", "del", veths[0])  # still here only if setup failed before moving it


@pytest.fixture
def peers(namespaces, tmp_path):
    """Depends on `namespaces` so that its teardown, killing the peers, runs before the namespaces are deleted."""
    processes = PeerProcesses(tmp_path, SWARM)
    yield processes
    processes.kill()


def netns_exec(name: str) -> tuple[str, ...]:
    return ("ip", "netns", "exec", name)


def test_node_ip_inside_a_namespace_without_a_default_route(namespaces):
    (name, address), _ = namespaces
    assert ip("-n", name, "route", "show", "default").stdout.strip() == ""
    code = "from workers.core.network import node_ip; print(node_ip())"
    done = subprocess.run([*netns_exec(name), sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == address


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_peers_in_two_namespaces_announce_their_own_ip_and_average(namespaces, peers, tmp_path):
    (name_a, address_a), (name_b, address_b) = namespaces
    first = peers.start(0, "--host_maddr", "/ip4/0.0.0.0/tcp/0", prefix=netns_exec(name_a))
    maddrs = read_visible_maddrs(tmp_path / "peer-0.out", timeout=150)
    hosts = {ipaddress.IPv4Address(maddr.split("/")[2]) for maddr in maddrs}
    assert hosts == {ipaddress.IPv4Address(address_a)}, f"peer 0 must announce only {address_a}: {maddrs}"
    assert not any(host.is_loopback or host.is_unspecified for host in hosts)
    # a fixed port in a fresh namespace: the standalone peer 1 listens on it exactly, not on port + 1 as in Ray
    second = peers.start(1, "--host_maddr", f"/ip4/0.0.0.0/tcp/{FIXED_PORT}", "--initial_peer", maddrs[0],
                         prefix=netns_exec(name_b))  # fmt: skip
    assert [first.wait(timeout=200), second.wait(timeout=200)] == [0, 0], logs(tmp_path)
    assert leftovers([first, second]) == [], "peers, hivemind processes or p2pd left behind"
    second_maddrs = logged_maddrs(tmp_path / "peer-1.log")
    assert second_maddrs and all(m.startswith(f"/ip4/{address_b}/tcp/{FIXED_PORT}/p2p/") for m in second_maddrs)
    # the only path between the peers is the veth: a group of 2 means peer 1 dialled peer 0's announced address
    metrics = pd.concat(pd.read_csv(tmp_path / f"peer-{i}" / "metrics.csv") for i in range(2))
    assert sorted(metrics.groupby("peer")["epoch"].apply(list)) == [list(range(1, EPOCHS + 1))] * 2
    final = metrics[metrics.epoch == EPOCHS]
    # a round per epoch, all but at most one succeeding (hivemind's leader can give up at its step's deadline on a
    # loaded machine, as in test_standalone); one group of 2 proves the dial over the veth
    assert (final.averaging_rounds_ok + final.averaging_rounds_failed >= EPOCHS).all(), "one round per epoch"
    assert (final.averaging_rounds_ok >= EPOCHS - 1).all()
    assert (metrics.averaging_group_size.dropna() == 2).all()
    assert metrics.averaging_group_size.notna().sum() >= 2 * (EPOCHS - 1)  # a failed round fails both peers' rows
