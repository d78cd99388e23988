"""Which address a peer listens on and which address it announces to the other peers.

On one machine everything is loopback. On a cluster a peer listens on all interfaces (or a configured one) and
announces its own node's IP, never 127.0.0.1: the other nodes could not dial that.
"""

from __future__ import annotations

import ipaddress
import socket
import sys

import psutil

from workers.config import NetworkConfig

ANY = "0.0.0.0"
LOOPBACK = "127.0.0.1"


def _ray():
    """The Ray module when this process is a Ray worker or driver; None otherwise (standalone peers never import
    Ray: they need not pay for the import)."""
    ray = sys.modules.get("ray")
    return ray if ray is not None and ray.is_initialized() else None


def ray_node_id() -> str:
    """The Ray node this process runs on ("" outside Ray)."""
    ray = _ray()
    return ray.get_runtime_context().get_node_id() if ray else ""


def node_ip() -> str:
    """This machine's IPv4 address as the other nodes see it: Ray's node IP inside a Ray worker, else the address of
    the interface that routes outward, else the first non-loopback interface address."""
    if ray := _ray():
        return ray.util.get_node_ip_address()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect(("10.255.255.255", 1))  # UDP: selects the outgoing interface, sends nothing
            address = sock.getsockname()[0]
            if not ipaddress.ip_address(address).is_loopback:
                return address
    except OSError:
        pass  # no route (e.g. a network namespace without a default route)
    for addresses in psutil.net_if_addrs().values():
        for addr in addresses:
            if addr.family == socket.AF_INET and not ipaddress.ip_address(addr.address).is_loopback:
                return addr.address
    return LOOPBACK


def listen_host(network: NetworkConfig) -> str:
    """`network.host` with "auto" (left unresolved, e.g. outside Ray) taken as loopback."""
    return LOOPBACK if network.host == "auto" else network.host


def announce_host(network: NetworkConfig) -> str:
    """The address the other peers dial: `announce_host`, else this node's IP when listening on all interfaces."""
    if network.announce_host:
        return network.announce_host
    host = listen_host(network)
    return node_ip() if host == ANY else host


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def peer_port(network: NetworkConfig, offset: int) -> int:
    """Peer i listens on `port + i`; port 0 means any free port."""
    return network.port + offset if network.port else free_port(listen_host(network))


def dht_maddrs(network: NetworkConfig, offset: int = 0) -> tuple[list[str], list[str]]:
    """(host_maddrs, announce_maddrs) of a hivemind DHT listening on `port + offset` (Ray peer i: offset i)."""
    port = peer_port(network, offset)
    return [f"/ip4/{listen_host(network)}/tcp/{port}"], [f"/ip4/{announce_host(network)}/tcp/{port}"]
