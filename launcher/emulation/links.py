"""Bandwidth-limited swarms on one machine (`emulation:`): every peer in a network namespace of its own, joined to the
others through a veth pair into one bridge, its upload and download shaped with HTB (and delayed with netem when the
kernel has it), each link measured before training.

    peer i's namespace                  the hub namespace (the bridge, and the address links are measured against)
    gl<token>p<i> 10.214.0.<i+2> ──veth── gl<token>h<i> ── bridge gl<token>br 10.214.0.1
    egress shaped: upload                 egress shaped: download

Everything the peer sends from its namespace goes through its link (p2pd, gloo, the rendezvous); Ray's own traffic
stays outside (workers/core/netns.py). The bridge sits in a namespace too, so nothing is added to this machine's own
network: deleting the namespaces deletes every veth and the bridge with them.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import psutil

from launcher.emulation.linkmeter import Measured, measure_link
from workers.core.config import EmulationConfig
from workers.core.errors import ConfigError
from workers.core.netns import NetnsLink

logger = logging.getLogger("launcher")

SUBNET = "10.214.0"  # inside the namespaces only: runs at the same time cannot clash, nor clash with this machine
HUB_IP = f"{SUBNET}.1"
TOLERANCE = 0.2  # a measured rate or RTT more than 20% off its target fails the run
RTT_SLACK_MS = 2.0  # the RTT measurement's own Python timing, on a busy machine
QUANTUM = 60_000  # HTB's per-class quantum (one class per link: only silences tc's "quantum is big" warning)


class EmulationError(RuntimeError):
    """The emulated links could not be set up, or do not carry what they were set to."""


@dataclass(frozen=True)
class LinkTarget:
    peer: int
    up_mbit: float
    down_mbit: float
    rtt_ms: float  # between two peers of this link: each link's two ends delay by a quarter of it


def link_targets(emulation: EmulationConfig, peers: int) -> list[LinkTarget]:
    """Each peer's link: `emulation`'s rate and RTT, with its entry of `emulation.links` on top."""
    targets = []
    for peer in range(peers):
        own = emulation.links.get(peer)
        rate = own.rate_mbit if own and own.rate_mbit is not None else emulation.rate_mbit
        up = own.up_mbit if own and own.up_mbit is not None else rate
        down = own.down_mbit if own and own.down_mbit is not None else rate
        rtt = own.rtt_ms if own and own.rtt_ms is not None else emulation.rtt_ms
        targets.append(LinkTarget(peer, up, down, rtt))
    return targets


def netem_limit(rate_mbit: float, delay_ms: float) -> int:
    """netem's queue in packets: twice what the link holds in flight (1000, its default, drops at high rates)."""
    in_flight = rate_mbit * 1e6 / 8 * delay_ms / 1e3 / 1500
    return max(1000, math.ceil(2 * in_flight))


def shaping_commands(namespace: str, dev: str, rate_mbit: float, delay_ms: float, verb: str = "add") -> list[list[str]]:
    """tc commands that cap what `dev` (in `namespace`) sends to `rate_mbit`, delayed by `delay_ms` when > 0.
    `verb` "change" retunes an existing link (its root qdisc stays)."""
    tc, rate = ["tc", "-n", namespace], f"{round(rate_mbit * 1000)}kbit"
    root = [*tc, "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "1"]
    commands = [root] if verb == "add" else []
    commands.append([*tc, "class", verb, "dev", dev, "parent", "1:", "classid", "1:1", "htb", "rate", rate, "ceil",
                     rate, "quantum", str(QUANTUM)])  # fmt: skip
    if delay_ms > 0:
        limit = str(netem_limit(rate_mbit, delay_ms))
        commands.append([*tc, "qdisc", verb, "dev", dev, "parent", "1:1", "handle", "10:", "netem", "delay",
                         f"{delay_ms:g}ms", "limit", limit])  # fmt: skip
    return commands


def link_problems(targets: list[LinkTarget], measured: list[Measured], tolerance: float = TOLERANCE) -> list[str]:
    """What is more than `tolerance` off its target, one line per figure (none: every link is as set)."""
    problems = []
    for target, got in zip(targets, measured, strict=True):
        for what, want, have, slack in (("upload", target.up_mbit, got.up_mbit, 0.0),
                                        ("download", target.down_mbit, got.down_mbit, 0.0),
                                        ("rtt", target.rtt_ms, got.rtt_ms, RTT_SLACK_MS)):  # fmt: skip
            if abs(have - want) > tolerance * want + slack:
                unit = "ms" if what == "rtt" else "Mbit/s"
                problems.append(f"peer {target.peer} {what}: {have:.3g} {unit} measured, {want:g} {unit} set")
    return problems


class Emulation:
    """The namespaces, links and shaping of one run. Names are the run's own (`token`), so runs side by side and
    leftovers are told apart; `teardown` removes everything, whatever was created."""

    def __init__(self, emulation: EmulationConfig, peers: int, token: str | None = None):
        self.token = token or owned_token()
        self.targets = link_targets(emulation, peers)
        self.hub, self.bridge = f"gossip-{self.token}-hub", f"gl{self.token}br"  # interface names: 15 chars at most
        self.links = {peer: NetnsLink(f"gossip-{self.token}-p{peer}", f"{SUBNET}.{peer + 2}", f"gl{self.token}p{peer}")
                      for peer in range(peers)}  # fmt: skip
        self.reaper: subprocess.Popen | None = None

    def hub_dev(self, peer: int) -> str:
        return f"gl{self.token}h{peer}"

    def namespaces(self) -> list[str]:
        return [self.hub, *(link.namespace for link in self.links.values())]

    def setup_commands(self) -> list[list[str]]:
        """Every ip/tc command that builds the run's links, in order."""
        hub = ["ip", "-n", self.hub]
        commands = [["ip", "netns", "add", self.hub], [*hub, "link", "set", "lo", "up"],
                    [*hub, "link", "add", self.bridge, "type", "bridge"],
                    [*hub, "addr", "add", f"{HUB_IP}/24", "dev", self.bridge],
                    [*hub, "link", "set", self.bridge, "up"]]  # fmt: skip
        for target in self.targets:
            commands += self.peer_commands(target.peer) + self.shaping(target)
        return commands

    def peer_commands(self, peer: int) -> list[list[str]]:
        """The peer's namespace and its veth pair (made right in the two namespaces: never on this machine's own)."""
        link, hub_dev, hub = self.links[peer], self.hub_dev(peer), ["ip", "-n", self.hub]
        own = ["ip", "-n", link.namespace]
        return [["ip", "netns", "add", link.namespace],
                ["ip", "link", "add", link.ifname, "netns", link.namespace, "type", "veth", "peer", "name", hub_dev,
                 "netns", self.hub],
                [*own, "addr", "add", f"{link.ip}/24", "dev", link.ifname], [*own, "link", "set", "lo", "up"],
                [*own, "link", "set", link.ifname, "up"], [*hub, "link", "set", hub_dev, "master", self.bridge],
                [*hub, "link", "set", hub_dev, "up"]]  # fmt: skip

    def shaping(self, target: LinkTarget, verb: str = "add") -> list[list[str]]:
        """Upload on the peer's end, download on the hub's; each end delays by a quarter of the RTT."""
        link, delay = self.links[target.peer], target.rtt_ms / 4
        upload = shaping_commands(link.namespace, link.ifname, target.up_mbit, delay, verb)
        return upload + shaping_commands(self.hub, self.hub_dev(target.peer), target.down_mbit, delay, verb)

    def create(self) -> None:
        remove_orphans()
        self.reaper = start_reaper(self.token)  # before the first namespace: nothing outlives a SIGKILLed driver
        for command in self.setup_commands():
            run(command)
        links = ", ".join(f"{t.up_mbit:g}/{t.down_mbit:g} Mbit/s {t.rtt_ms:g} ms" for t in self.targets)
        logger.info("emulation: %d peers in namespaces gossip-%s-p*, links (up/down, rtt) %s", len(self.links),
                    self.token, links)  # fmt: skip

    def set_rate(self, rate_mbit: float) -> None:
        """Every link to `rate_mbit` both ways from now on (its RTT kept)."""
        self.targets = [LinkTarget(t.peer, rate_mbit, rate_mbit, t.rtt_ms) for t in self.targets]
        for target in self.targets:
            for command in self.shaping(target, verb="change"):
                run(command)

    def measure(self) -> list[Measured]:
        """Every link at once (the hub is not shaped, so they do not share a bottleneck): RTT, upload, download."""
        with ThreadPoolExecutor(max_workers=len(self.targets), thread_name_prefix="linkmeter") as pool:
            return list(pool.map(lambda t: measure_link(self.hub, HUB_IP, self.links[t.peer].namespace, t.up_mbit,
                                                        t.down_mbit, t.rtt_ms), self.targets))  # fmt: skip

    def start(self, run_dir: Path) -> None:
        """Build the links, measure them into `run_dir`/links.csv, and fail before any peer trains when one is
        more than TOLERANCE off, or when a peer could be on another machine."""
        only_this_machine()
        self.create()
        try:
            measured = self.measure()
        except OSError as err:  # e.g. a link that carries nothing: timed out
            raise EmulationError(f"the emulated links could not be measured: {err}") from err
        write_links(run_dir / "links.csv", self.targets, measured, self.links)
        if problems := link_problems(self.targets, measured):
            raise EmulationError(f"the emulated links are more than {TOLERANCE:.0%} off their targets (see "
                                 f"{run_dir / 'links.csv'}): " + "; ".join(problems))  # fmt: skip
        logger.info("emulation: links measured within %.0f%% of their targets -> %s", 100 * TOLERANCE,
                    run_dir / "links.csv")  # fmt: skip

    def teardown(self) -> None:
        """Delete the run's namespaces (the hub's first: its bridge and veth ends take the peers' ends along)."""
        for namespace in self.namespaces():
            done = subprocess.run(["ip", "netns", "del", namespace], capture_output=True, text=True, timeout=30)
            if done.returncode != 0 and "No such file" not in done.stderr:
                logger.error("emulation: could not delete namespace %s: %s", namespace, done.stderr.strip())
        if self.reaper is not None:
            self.reaper.stdin.close()  # nothing left for it: it exits
            self.reaper.wait(timeout=30)

    def leftovers(self) -> list[str]:
        """The run's namespaces and interfaces still on this machine (none after `teardown`)."""
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, timeout=30).stdout
        return [line for line in (names + links).splitlines() if self.token in line]


def owned_token() -> str:
    """A run's name part: this process's pid (6 hex digits) and 2 random ones, so that a run whose process died without
    its teardown (SIGKILL, a Tune trial ended by `ray.kill`) is recognised and its namespaces removed later."""
    return f"{os.getpid() & 0xFFFFFF:06x}{secrets.token_hex(1)}"


def start_reaper(token: str) -> subprocess.Popen:
    """A process of its own session that waits for this one to end (its stdin closes: a normal teardown, or a
    SIGKILL, or a Ray Tune trial ended by `ray.kill`) and then deletes whatever namespaces of `token` are left."""
    return subprocess.Popen([sys.executable, "-c", f"from launcher.emulation.links import reap; reap({token!r})"],
                            stdin=subprocess.PIPE, start_new_session=True)  # fmt: skip


def reap(token: str) -> None:
    """The reaper's body: wait for the owner's end, then delete the namespaces named after `token`."""
    sys.stdin.buffer.read()  # returns at EOF: the owner closed it, or died
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
    names = [line.split()[0] for line in listed.splitlines() if line.strip()]
    for name in sorted((n for n in names if n.startswith(f"gossip-{token}-")), key=lambda n: not n.endswith("hub")):
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


def orphaned_namespaces(names: list[str], alive) -> list[str]:
    """The `gossip-<token>-...` namespaces whose owner (the pid in the token) is not alive (a probe's too)."""
    found = [(name, re.fullmatch(r"gossip-([0-9a-f]{6})[0-9a-f]{2}-(hub|p\d+|probe)", name)) for name in names]
    return [name for name, match in found if match and not alive(int(match.group(1), 16))]


def remove_orphans(wait_s: float = 0.0) -> list[str]:
    """Delete the namespaces of runs whose process is gone (waiting up to `wait_s` for dying owners first); nothing
    where namespaces cannot be listed (not root, no iproute2)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return []
    deadline = time.monotonic() + wait_s
    while True:
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
        names = [line.split()[0] for line in listed.splitlines() if line.strip()]
        orphans = orphaned_namespaces(names, psutil.pid_exists)
        owned = [name for name in names if name.startswith("gossip-") and name not in orphans]
        if not owned or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    for name in orphans:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
    if orphans:
        logger.warning("emulation: removed %d namespaces left by runs that were killed: %s", len(orphans),
                       ", ".join(orphans))  # fmt: skip
    return orphans


def write_links(path: Path, targets: list[LinkTarget], measured: list[Measured], links: dict[int, NetnsLink]) -> None:
    columns = ["peer", "namespace", "ip", "target_up_mbit", "up_mbit", "target_down_mbit", "down_mbit",
               "target_rtt_ms", "rtt_ms", "within_tolerance"]  # fmt: skip
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(columns)
        for target, got in zip(targets, measured, strict=True):
            ok, link = not link_problems([target], [got]), links[target.peer]
            writer.writerow([target.peer, link.namespace, link.ip, target.up_mbit, round(got.up_mbit, 3),
                             target.down_mbit, round(got.down_mbit, 3), target.rtt_ms, round(got.rtt_ms, 3),
                             ok])  # fmt: skip


def run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise EmulationError(f"`{' '.join(command)}` failed: {done.stderr.strip() or done.returncode}")


def only_this_machine() -> None:
    """Namespaces are this machine's: a peer scheduled on another node would run unshaped, or not at all."""
    import ray

    nodes = [node for node in ray.nodes() if node["Alive"]]
    if len(nodes) != 1:
        raise EmulationError(f"emulation needs every peer on this machine, but the Ray cluster has {len(nodes)} "
                             "nodes: run with a private local Ray (--address local)")  # fmt: skip


# -- what this machine supports (the CLI asks before Ray starts) -----------------------------------------------------


@dataclass(frozen=True)
class Support:
    """What a throwaway namespace showed: each field None when it works, else why not."""

    root: str | None = None
    tools: str | None = None
    namespaces: str | None = None
    htb: str | None = None
    netem: str | None = None


@lru_cache(maxsize=1)
def probe() -> Support:
    """Try namespaces, HTB and netem on a veth pair in a throwaway namespace (deleted again)."""
    if os.geteuid() != 0:
        return Support(root="not root (network namespaces and tc need CAP_NET_ADMIN and CAP_SYS_ADMIN)")
    if missing := [tool for tool in ("ip", "tc") if shutil.which(tool) is None]:
        return Support(tools=f"`{'`, `'.join(missing)}` not installed (iproute2)")
    name, tried = f"gossip-{owned_token()}-probe", {}  # owned: a probe cut short is an orphan like a run's
    veth = ["ip", "-n", name, "link", "add", "glprobe0", "type", "veth", "peer", "name", "glprobe1"]
    netem = ["tc", "-n", name, "qdisc", "add", "dev", "glprobe1", "root", "netem", "delay", "1ms"]
    steps = {"namespaces": [["ip", "netns", "add", name], veth], "htb": shaping_commands(name, "glprobe0", 100, 0),
             "netem": [netem]}  # fmt: skip
    try:
        for what, commands in steps.items():
            tried[what] = _first_failure(commands)
            if what == "namespaces" and tried[what]:
                break
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
    return Support(**tried)


def _first_failure(commands: list[list[str]]) -> str | None:
    for command in commands:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            return f"`{' '.join(command)}`: {done.stderr.strip() or f'exit {done.returncode}'}"
    return None


def support_problem(emulation: EmulationConfig, support: Support) -> str | None:
    """Why `emulation` cannot run on this machine, naming what is missing and what would work; None: it can."""
    if blocker := support.root or support.tools or support.namespaces:
        return f"emulation.rate_mbit={emulation.rate_mbit:g}: cannot put peers in network namespaces: {blocker}"
    if support.htb:
        return f"emulation.rate_mbit={emulation.rate_mbit:g}: this kernel cannot shape with HTB: {support.htb}"
    delayed = [f"emulation.rtt_ms={emulation.rtt_ms:g}"] if emulation.rtt_ms else []
    delayed += [f"emulation.links.{peer}.rtt_ms={link.rtt_ms:g}" for peer, link in emulation.links.items()
                if link.rtt_ms]  # fmt: skip
    if delayed and support.netem:
        return (f"{', '.join(delayed)}: this kernel has no netem qdisc, so latency cannot be emulated "
                f"({support.netem}); rate shaping works: set emulation.rtt_ms: 0 (and no rtt_ms in emulation.links), "
                "or load netem (modprobe sch_netem)")  # fmt: skip
    return None


def check_support(emulation: EmulationConfig) -> None:
    """ConfigError when this machine cannot emulate `emulation`'s links (never run unshaped instead)."""
    if emulation.enabled and (problem := support_problem(emulation, probe())):
        raise ConfigError(problem)
