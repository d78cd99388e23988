"""`resources.cap_cpu`: each peer's processes (its actor, hivemind's DHT and averager processes, p2pd) held to
`resources.num_cpus` cores by a cgroup CPU quota, as if each peer had a machine of its own.

Without it, peers that share a machine share its cores: a peer that sleeps (a `slow` straggler, a peer waiting for
its group) hands its share to the others, which then train faster, so a straggler slows a synchronous all-reduce far
less than it would where every peer has its own device. With the cap a peer never gets more than its share.

The cgroup v1 `cpu` controller (`cpu.cfs_quota_us` per `cpu.cfs_period_us`) or the v2 one (`cpu.max`); a group per
peer incarnation under `gossip-launcher/<run id>/`. Needs root. A process joins its group before it forks hivemind's
processes, which inherit it.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

PERIOD_US = 100_000
ROOTS = (Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup"))  # v1's cpu hierarchy, or a v2 one with `cpu`
BASE = "gossip-launcher"


class CpuCapError(RuntimeError):
    """No cgroup CPU controller this process can use."""


def cpu_hierarchy() -> Path | None:
    """The cgroup hierarchy whose CPU quota this process can set, or None."""
    for root in ROOTS:
        v1 = (root / "cpu.cfs_quota_us").exists()
        v2 = (root / "cgroup.controllers").exists() and "cpu" in (root / "cgroup.controllers").read_text().split()
        if (v1 or v2) and os.access(root, os.W_OK):
            return root
    return None


def cap_this_process(group: str, cores: float) -> Path:
    """Move this process into cgroup BASE/<group> capped at `cores` cores; the group's path."""
    root = cpu_hierarchy()
    if root is None:
        raise CpuCapError("resources.cap_cpu: no cgroup cpu controller is writable here (needs root and a cgroup "
                          "v1 'cpu' or v2 'cpu' hierarchy): set resources.cap_cpu=false")  # fmt: skip
    path = root / BASE / group
    path.mkdir(parents=True, exist_ok=True)
    if not (path / "cpu.cfs_quota_us").exists() and root == ROOTS[1]:  # v2: the parents hand the controller down
        for parent in (root, root / BASE, *path.parents):
            if parent.is_relative_to(root) and parent != path:
                with contextlib.suppress(OSError):
                    (parent / "cgroup.subtree_control").write_text("+cpu")
    set_quota(path, cores)
    (path / "cgroup.procs").write_text(str(os.getpid()))
    return path


def set_quota(path: Path, cores: float) -> None:
    """Cap the processes of cgroup `path` at `cores` cores (also while they run: a `slow` straggler)."""
    quota = max(1000, int(cores * PERIOD_US))
    if (path / "cpu.cfs_quota_us").exists():
        (path / "cpu.cfs_period_us").write_text(str(PERIOD_US))
        (path / "cpu.cfs_quota_us").write_text(str(quota))
    else:
        (path / "cpu.max").write_text(f"{quota} {PERIOD_US}")


def remove_caps(prefix: str, wait_s: float = 10.0) -> None:
    """Remove the groups under BASE/<prefix> on this machine, deepest first, as their processes end (a killed
    actor's processes take a moment to leave its group): tries for up to `wait_s`; a group that still holds a live
    process then stays."""
    root = cpu_hierarchy()
    top = root / BASE / prefix if root else None
    deadline = time.monotonic() + wait_s
    while top is not None and top.is_dir():
        for path in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                path.rmdir()
        with contextlib.suppress(OSError):
            top.rmdir()
        if not top.is_dir() or time.monotonic() > deadline:
            return
        time.sleep(0.2)
