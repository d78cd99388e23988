"""Where the peers run: one placement-group bundle per peer (and per scripted joiner), checked against the
cluster before waiting for it, and the network address the peers listen on once it is known how many nodes they
span."""

from __future__ import annotations

import logging

import ray
from ray.util.placement_group import placement_group, placement_group_table

from launcher.driver.connect import alive_nodes
from workers.core.config import ExperimentConfig
from workers.core.network import ANY, LOOPBACK

logger = logging.getLogger("launcher")


def resolve_network(cfg: ExperimentConfig, nodes: int) -> ExperimentConfig:
    """`network.host: auto`: loopback when every peer is on one node, all interfaces (each peer announces its node's
    IP) when they are spread over `nodes` > 1. A fixed host or announce address is one machine's: it cannot serve
    peers on several nodes."""
    net = cfg.network
    fixed_host = net.host not in ("auto", ANY)
    if nodes > 1 and (fixed_host or net.announce_host):
        fixed = f"network.host={net.host}" if fixed_host else f"network.announce_host={net.announce_host}"
        raise PlacementError(f"{fixed} is one machine's address, but the peers were placed on {nodes} nodes: use "
                             "network.host auto or 0.0.0.0 (each peer announces its own node's IP)")  # fmt: skip
    if net.host != "auto":
        return cfg
    host = ANY if nodes > 1 else LOOPBACK
    return cfg.model_copy(update={"network": net.model_copy(update={"host": host})})


class PlacementError(RuntimeError):
    """The cluster cannot hold the peers' placement group (now, or ever)."""


def peer_bundles(cfg: ExperimentConfig) -> list[dict[str, float]]:
    """One placement-group bundle per peer: its CPUs, GPUs and custom resources."""
    res = cfg.resources
    base = {"CPU": res.num_cpus, **({"GPU": res.num_gpus} if res.num_gpus else {}), **res.custom}
    own = [{**base, **(res.peer_custom[i] if res.peer_custom else {})} for i in range(cfg.peers)]
    return own + [dict(base) for _ in range(cfg.joins)]  # scripted joiners: reserved up front, like the others


def check_placeable(bundles: list[dict[str, float]], strategy: str, nodes: list[dict[str, float]]) -> None:
    """Fail at once, naming the resource, when the cluster's nodes could never hold the peers' bundles (e.g. GPUs on
    a CPU-only cluster, or more GPUs than the cluster has), instead of waiting for a placement group that will never
    be scheduled. `nodes`: each alive node's total resources."""

    def fits(bundle: dict[str, float], node: dict[str, float]) -> bool:
        return all(node.get(name, 0.0) >= amount for name, amount in bundle.items())

    have = "; ".join(_format_resources(node) for node in nodes) or "no nodes"
    hint = f"(nodes: {have}; nodes that are still starting do not count yet: see `ray status`)"
    for peer, bundle in enumerate(bundles):
        if not any(fits(bundle, node) for node in nodes):
            short = {k: v for k, v in bundle.items() if not any(node.get(k, 0.0) >= v for node in nodes)} or bundle
            raise PlacementError(f"peer {peer} needs {_format_resources(bundle)} on one node, but no node of "
                                 f"the cluster has {_format_resources(short)} {hint}; see resources.*")  # fmt: skip
    total = {k: sum(b.get(k, 0.0) for b in bundles) for b in bundles for k in b}
    cluster = {k: sum(node.get(k, 0.0) for node in nodes) for k in total}
    if not fits(total, cluster):
        raise PlacementError(f"{len(bundles)} peers need {_format_resources(total)} in all, the cluster has "
                             f"{_format_resources(cluster)} {hint}")  # fmt: skip
    if strategy == "STRICT_PACK" and not any(fits(total, node) for node in nodes):
        raise PlacementError(f"placement STRICT_PACK needs {_format_resources(total)} on one node {hint}")
    if strategy == "STRICT_SPREAD":
        usable = sum(any(fits(bundle, node) for bundle in bundles) for node in nodes)
        if usable < len(bundles):
            raise PlacementError(f"placement STRICT_SPREAD needs {len(bundles)} nodes that can hold a peer, the "
                                 f"cluster has {usable} {hint}")  # fmt: skip


def placement_strategy(cfg: ExperimentConfig) -> str:
    """`resources.placement`, or by default PACK for peers that share GPUs (a fraction each), else SPREAD."""
    res = cfg.resources
    return res.placement or ("PACK" if 0 < res.num_gpus < 1 else "SPREAD")


def _format_resources(resources: dict[str, float]) -> str:
    shown = {k: v for k, v in resources.items() if not k.startswith(("node:", "memory", "object_store_memory"))}
    return ", ".join(f"{k}={v:g}" for k, v in sorted(shown.items())) or "nothing"


def reserve(cfg: ExperimentConfig, run_id: str) -> tuple[object, list[dict[str, float]], dict[int, str], int]:
    """The placement group of one bundle per peer (SPREAD by default: different nodes when possible), or fail fast;
    returns it with the bundles, each peer's node id, and the index of peer 0's bundle: 1 inside a Ray Tune trial,
    whose placement group (the trial's bundle, then the peers') was reserved by Tune, else 0 (a group of our own)."""
    strategy, bundles, nodes = placement_strategy(cfg), peer_bundles(cfg), alive_nodes()
    group, first = trial_placement_group(len(bundles)), 1
    if group is None:
        check_placeable(bundles, strategy, [node["Resources"] for node in nodes])
        group, first = placement_group(bundles, strategy=strategy, name=f"{run_id}/peers"), 0
    timeout = cfg.resources.placement_timeout
    try:
        ray.get(group.ready(), timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        raise PlacementError(
            f"the cluster could not place {len(bundles)} peers ({_format_resources(bundles[0])} each, "
            f"{strategy}) within resources.placement_timeout={timeout:g} s: its resources are "
            f"busy (available now: {_format_resources(ray.available_resources())})"
        ) from None
    table = placement_group_table(group)["bundles_to_node_id"]
    bundle_nodes = {i: table[i + first] for i in range(len(bundles))}
    addresses = {node["NodeID"]: node["NodeManagerAddress"] for node in nodes}
    logger.info("placement (%s): %s", strategy, ", ".join(
        f"peer {i} on {addresses.get(n, '?')} (node {n[:8]})" for i, n in bundle_nodes.items()))  # fmt: skip
    return group, bundles, bundle_nodes, first


def trial_placement_group(peers: int):
    """The placement group Ray Tune reserved for the trial this process runs (launcher/sweep/runner.py: the trial's own
    bundle, then one per peer), or None outside a trial."""
    group = ray.util.get_current_placement_group()
    return group if group is not None and len(group.bundle_specs) == peers + 1 else None


def trial_bundles(cfg: ExperimentConfig) -> tuple[list[dict[str, float]], str]:
    """What a Tune trial of `cfg` reserves: a sliver of CPU for the trial's driver loop, then the peers' bundles."""
    return [{"CPU": TRIAL_CPU}, *peer_bundles(cfg)], placement_strategy(cfg)


TRIAL_CPU = 0.01
