"""Bandwidth-limited swarms on one machine (`emulation:`): the decisions as plain functions, then the real thing —
peers in shaped network namespaces (root, iproute2 and HTB needed; skipped with the reason otherwise)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from launcher.emulation.linkmeter import MAX_BYTES, MIN_BYTES, Measured, probe_bytes, steady_rate_mbit
from launcher.emulation.links import (
    Emulation,
    LinkTarget,
    Support,
    link_problems,
    link_targets,
    netem_limit,
    probe,
    shaping_commands,
    support_problem,
)
from tests.conftest import QUICKSTART, ROOT, quick_config, ray_processes_left, ray_started
from tests.test_cli import wait_for_rows
from workers.core.config import EmulationConfig, parse_config
from workers.core.errors import ConfigError
from workers.core.netns import NetnsLink, inside, namespace_config

# -- the decisions, without root ---------------------------------------------------------------------------------------


def test_each_peer_gets_the_default_link_unless_it_has_its_own():
    emulation = EmulationConfig(rate_mbit=100, rtt_ms=10, links={1: {"rate_mbit": 20}, 2: {"up_mbit": 5, "rtt_ms": 0}})
    assert link_targets(emulation, 4) == [
        LinkTarget(0, 100, 100, 10),
        LinkTarget(1, 20, 20, 10),
        LinkTarget(2, 5, 100, 0),  # an asymmetric link: only its upload differs
        LinkTarget(3, 100, 100, 10),
    ]


def test_shaping_is_htb_at_the_rate_with_netem_only_for_a_delay():
    (root, rate_class) = shaping_commands("ns", "dev0", 12.5, 0)
    assert root == ["tc", "-n", "ns", "qdisc", "add", "dev", "dev0", "root", "handle", "1:", "htb", "default", "1"]
    assert rate_class[:6] == ["tc", "-n", "ns", "class", "add", "dev"] and "12500kbit" in rate_class
    assert rate_class[rate_class.index("rate") + 1] == rate_class[rate_class.index("ceil") + 1] == "12500kbit"
    delayed = shaping_commands("ns", "dev0", 1000, 25)
    assert len(delayed) == 3 and delayed[2][-4:] == ["delay", "25ms", "limit", str(netem_limit(1000, 25))]
    assert delayed[2][delayed[2].index("parent") + 1] == "1:1", "netem delays what the HTB class lets through"
    retuned = shaping_commands("ns", "dev0", 50, 25, verb="change")
    assert [c[3:5] for c in retuned] == [["class", "change"], ["qdisc", "change"]], "the root qdisc stays"


def test_netem_queue_holds_what_the_link_has_in_flight():
    assert netem_limit(10, 1) == 1000  # tc's default is plenty
    assert netem_limit(1000, 50) >= 2 * 1000e6 / 8 * 0.05 / 1500  # 1 Gbit/s x 50 ms: ~4200 packets, twice over


def test_links_more_than_20_percent_off_are_named_with_their_figures():
    targets = [LinkTarget(0, 100, 100, 0), LinkTarget(1, 10, 40, 20)]
    assert link_problems(targets, [Measured(95, 81, 0.1), Measured(11.9, 32.5, 23.9)]) == []
    problems = link_problems(targets, [Measured(79, 100, 0.1), Measured(10, 40, 30)])
    assert problems == ["peer 0 upload: 79 Mbit/s measured, 100 Mbit/s set", "peer 1 rtt: 30 ms measured, 20 ms set"]
    assert link_problems([LinkTarget(0, 10, 10, 0)], [Measured(13, 10, 0.1)]), "too fast is off too (unshaped?)"


def test_the_rate_leaves_out_slow_start():
    # 1 MB in 1 s, but the first quarter took 0.5 s (slow start): the steady part runs at 750 KB / 0.5 s = 12 Mbit/s
    samples = [(0.0, 1000), (0.5, 250_000), (0.75, 625_000), (1.0, 1_000_000)]
    assert steady_rate_mbit(samples) == pytest.approx(750_000 * 8 / 0.5 / 1e6)
    assert probe_bytes(100, 0) == 100e6 / 8 * 0.5, "half a second of the link"
    assert probe_bytes(0.1, 0) == MIN_BYTES and probe_bytes(100_000, 0) == MAX_BYTES
    assert probe_bytes(10, 100) == 10e6 / 8 * 2.0, "20 round trips at least"


def test_unsupported_machines_are_told_what_is_missing_and_what_works():
    shaped, delayed = EmulationConfig(rate_mbit=50), EmulationConfig(rate_mbit=50, links={1: {"rtt_ms": 30}})
    assert "not root" in support_problem(shaped, Support(root="not root (...)"))
    no_netem = Support(netem="`tc ... netem delay 1ms`: Error: Specified qdisc kind is unknown.")
    assert support_problem(shaped, no_netem) is None, "rates alone need no netem"
    message = support_problem(delayed, no_netem)
    assert "emulation.links.1.rtt_ms=30" in message and "no netem" in message
    assert "rate shaping works: set emulation.rtt_ms: 0" in message
    assert "HTB" in support_problem(shaped, Support(htb="`tc ... htb`: unknown"))


@pytest.mark.parametrize(
    "emulation, expected",
    [
        ({"rtt_ms": 20}, "emulation.rtt_ms needs emulation.rate_mbit"),
        ({"rate_mbit": 10, "links": {7: {"rate_mbit": 1}}}, "emulation.links.7: the swarm has peers 0..3"),
        ({"rate_mbit": 10, "links": {1: {"rate_mbit": 1, "up_mbit": 2}}}, "rate_mbit (both directions) or up_mbit"),
        ({"rate_mbit": 0}, "emulation.rate_mbit=0"),
        ({"rate_mbit": 10, "jitter_ms": 1}, "emulation.jitter_ms: unknown key"),
    ],
)
def test_bad_emulation_configs_name_the_field(emulation, expected):
    with pytest.raises(ConfigError, match="invalid config") as err:
        parse_config({"peers": 4, "emulation": emulation})
    assert expected in str(err.value)


def test_an_emulated_peer_listens_on_and_announces_its_namespace_address():
    cfg = quick_config("emulation.rate_mbit=10")
    with pytest.raises(ConfigError, match="announces its own namespace's address"):
        parse_config({"emulation": {"rate_mbit": 10}, "network": {"announce_host": "10.0.0.5"}})
    with pytest.raises(ConfigError, match="no network namespace"):
        namespace_config(cfg, None)  # e.g. a standalone peer given an emulated config: never unshaped
    inside_ns = namespace_config(cfg, NetnsLink("gossip-x-p0", "10.214.0.2", "glxp0"))
    assert (inside_ns.network.host, inside_ns.network.announce_host) == ("10.214.0.2", None)


def test_names_are_the_runs_own_and_fit_the_kernel():
    emulation = Emulation(EmulationConfig(rate_mbit=10), peers=12)
    other = Emulation(EmulationConfig(rate_mbit=10), peers=12)
    names = [emulation.bridge, *(link.ifname for link in emulation.links.values())]
    names += [emulation.hub_dev(peer) for peer in emulation.links]
    assert max(len(name) for name in names) <= 15 and len(set(names)) == len(names)
    assert not set(emulation.namespaces()) & set(other.namespaces())
    commands = emulation.setup_commands()
    made = [c for c in commands if c[:3] == ["ip", "link", "add"]]
    assert all(c.count("netns") == 2 for c in made), "each veth end is made in its namespace, none on this machine's"
    upload = [c for c in commands if c[:2] == ["tc", "-n"] and c[2] == emulation.links[3].namespace]
    download = [c for c in commands if c[:3] == ["tc", "-n", emulation.hub] and emulation.hub_dev(3) in c]
    assert upload and download, "peer 3's link is shaped at both ends"


# -- the real thing: root, iproute2, HTB ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def support() -> Support:
    found = probe()
    if blocker := found.root or found.tools or found.namespaces or found.htb:
        pytest.skip(f"emulation cannot run here: {blocker}")
    return found


@pytest.fixture
def links(support):
    """emulation(rate_mbit, peers): a created Emulation, torn down afterwards; checked for leftovers."""
    made = []

    def create(rate_mbit: float, peers: int = 2) -> Emulation:
        made.append(Emulation(EmulationConfig(rate_mbit=rate_mbit), peers))
        made[-1].create()
        return made[-1]

    yield create
    for emulation in made:
        emulation.teardown()
        assert emulation.leftovers() == []


def netns_inode() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


def test_a_thread_enters_a_namespace_and_comes_back_without_moving_the_others(links):
    emulation = links(100, peers=1)
    link, seen = emulation.links[0], {}
    here = netns_inode()

    def other_thread(started: threading.Event, go_on: threading.Event) -> None:
        started.set()
        go_on.wait(10)
        seen["other"] = netns_inode()

    started, go_on = threading.Event(), threading.Event()
    thread = threading.Thread(target=other_thread, args=(started, go_on))
    thread.start()
    started.wait(10)
    with inside(link.namespace):
        seen["inside"] = netns_inode()
        child = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True, check=True).stdout
        go_on.set()
        thread.join(10)
    assert seen["inside"] != here and netns_inode() == here and seen["other"] == here
    assert f"{link.ip}/24" in child, "a process forked from inside lives in the namespace"


def tx_bytes(link: NetnsLink) -> int:
    """Bytes the peer's end of its link has sent (the namespace's own counters)."""
    shown = ["ip", "-n", link.namespace, "-s", "-j", "link", "show", "dev", link.ifname]
    return json.loads(subprocess.run(shown, capture_output=True, text=True, check=True).stdout)[0]["stats64"]["tx"][
        "bytes"
    ]


MODEL_FLOATS = 2_500_000  # 10 MB of float32
ROUND_TIMEOUT = 30.0  # a round's matchmaking, or its all-reduce (10 MB at 50 Mbit/s: 1.6 s each way)


def averaging_round(averagers: list, emulation: Emulation) -> tuple[float, list[int]] | None:
    """One all-reduce of the averagers' tensors: seconds from the trigger (the group is formed: matchmaking is not
    timed) to the results, and the bytes each peer's link sent meanwhile; None for a round that did not average both
    (on a loaded machine, hivemind's matchmaking can leave a peer out: it reaches the trigger without a group, and its
    partner's all-reduce waits for it until allreduce_timeout)."""
    from hivemind.averaging.control import AveragingStage

    controls = [
        averager.step(wait=False, require_trigger=True, timeout=ROUND_TIMEOUT, allow_retries=False)
        for averager in averagers
    ]  # (a retry would time a second matchmaking: the test retries instead)
    deadline = time.monotonic() + ROUND_TIMEOUT
    while not all(control.stage == AveragingStage.AWAITING_TRIGGER for control in controls):
        if time.monotonic() > deadline or any(control.done() for control in controls):
            break
        time.sleep(0.01)
    before = [tx_bytes(link) for link in emulation.links.values()]
    started = time.perf_counter()
    for control in controls:
        control.allow_allreduce()
    groups = []
    for control in controls:  # every step ends (allreduce_timeout, step timeout) before the next round starts
        try:
            groups.append(len(control.result(timeout=3 * ROUND_TIMEOUT)))
        except Exception as error:  # noqa: BLE001 (a failed round is tried again by fastest_round)
            control.cancel()
            groups.append(repr(error))
    seconds = time.perf_counter() - started
    if groups != [2, 2]:
        print(f"a round that did not average both peers: {groups}")
        return None
    return seconds, [tx_bytes(link) - sent for link, sent in zip(emulation.links.values(), before, strict=True)]


def fastest_round(averagers: list, emulation: Emulation, rounds: int = 2, tries: int = 4) -> tuple[float, list[int]]:
    """The quickest of `rounds` rounds that averaged: a busy machine (others' tests) only ever adds time, the link
    sets the floor; a round that failed is tried again, up to `tries` rounds in all (so the last one averaged)."""
    done = []
    for _ in range(tries):
        if (timed := averaging_round(averagers, emulation)) is not None:
            done.append(timed)
        if len(done) == rounds:
            return min(done, key=lambda timed: timed[0])
    raise AssertionError(f"{len(done)} of {tries} rounds averaged both peers, not {rounds}")


@pytest.mark.integration
@pytest.mark.timeout(600)  # a failed round ends within 2 ROUND_TIMEOUTs (matchmaking, all-reduce): 8 tries at most
def test_a_shaped_link_carries_an_averaging_round_no_faster_than_its_rate(links):
    import hivemind
    import torch

    emulation, dhts, averagers = links(100), [], []
    try:
        for peer, link in emulation.links.items():
            with inside(link.namespace):  # the DHT's process, p2pd and the averager's process start in there
                initial = dhts[0].get_visible_maddrs() if dhts else []
                dhts.append(hivemind.DHT(initial_peers=initial, host_maddrs=[f"/ip4/{link.ip}/tcp/0"], start=True))
                averagers.append(hivemind.DecentralizedAverager(
                    [torch.full((MODEL_FLOATS,), float(peer))], dhts[-1], prefix="shaped", target_group_size=2,
                    min_group_size=2, allreduce_timeout=ROUND_TIMEOUT, start=True))  # fmt: skip
        fast, fast_sent = fastest_round(averagers, emulation)
        emulation.set_rate(50)
        slow, slow_sent = fastest_round(averagers, emulation)
        with averagers[0].get_tensors() as first, averagers[1].get_tensors() as second:
            assert torch.equal(first[0], second[0]), "the last round left both peers with one average"
            assert 0 < first[0].min() and first[0].max() < 1, "the rounds really averaged (from 0 and 1)"
    finally:
        for process in averagers + dhts:
            process.shutdown()
    # hivemind's all-reduce in a group of n: each peer sends n-1 of its n parts out and n-1 averaged parts back
    payload = 2 * (2 - 1) / 2 * MODEL_FLOATS * 4
    assert min(fast_sent + slow_sent) >= payload, "the round's bytes went through the peers' links"
    assert fast >= 0.97 * max(fast_sent) * 8 / 100e6, f"{fast:.2f} s for {max(fast_sent)} bytes: faster than 100 Mbit/s"
    assert slow >= 0.97 * max(slow_sent) * 8 / 50e6, f"{slow:.2f} s for {max(slow_sent)} bytes: faster than 50 Mbit/s"
    assert slow >= 1.6 * fast, f"half the rate: {slow:.2f} s against {fast:.2f} s"


def system_leftovers(token: str) -> list[str]:
    shown = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    shown += subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    return [line for line in shown.splitlines() if token in line]


def emulated_run(out: Path, *settings: str) -> list[str]:
    """The CLI command of a 2-peer quickstart run with `settings` (`key=value`), on a private local Ray."""
    sets = [arg for setting in ("gossip.matchmaking_time=1.5", *settings) for arg in ("--set", setting)]
    return [sys.executable, "-m", "launcher", "run", str(QUICKSTART), "--peers", "2", *sets, "--address", "local",
            "--out", str(out)]  # fmt: skip


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_a_quickstart_run_trains_on_measured_links_and_leaves_nothing(support, tmp_path, private_ray_env):
    launch = emulated_run(tmp_path, "optim.epochs=2", "emulation.rate_mbit=40", "emulation.links.1.down_mbit=20")
    done = subprocess.run(launch, cwd=ROOT, env=private_ray_env, capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = tmp_path.iterdir()
    links = pd.read_csv(run_dir / "links.csv")
    assert list(links.peer) == [0, 1] and list(links.target_down_mbit) == [40, 20]
    for direction in ("up", "down"):
        off = (links[f"{direction}_mbit"] / links[f"target_{direction}_mbit"] - 1).abs()
        assert (off <= 0.2).all(), f"{direction}load more than 20% off: {links.to_dict('records')}"
    assert links.within_tolerance.all()
    assert f"peer 0 is up at ['/ip4/{links.ip[0]}/tcp/" in done.stderr, "peer 0 announced its namespace's address"
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert sorted(metrics.groupby("peer").epoch.apply(list)) == [[1, 2], [1, 2]]
    # the namespaces' only way to each other is the bridge: a group of 2 went over the shaped links
    assert (metrics.averaging_group_size == 2).all() and (metrics.averaging_rounds_ok >= 1).all()
    token = links.namespace[0].split("-")[1]
    assert system_leftovers(token) == [], "namespaces, veths or the bridge left behind"
    time.sleep(2)  # Ray's own processes of this run (its session folders stay): none left running
    assert ray_processes_left(private_ray_env) == [], "no process of the run's Ray is left"


@pytest.mark.parametrize(
    "args, expected",
    [
        (
            ["--set", "emulation.rtt_ms=20"],
            ["emulation.rtt_ms=20", "no netem", "rate shaping works: set emulation.rtt_ms: 0"],
        ),
        (["--address", "10.0.0.1:6379"], ["emulated links need every peer on this machine", "--address local"]),
    ],
)
def test_what_cannot_be_emulated_is_refused_before_ray_starts(args, expected, support, tmp_path, private_ray_env):
    if "--set" in args and support.netem is None:
        pytest.skip("this kernel has netem: rtt_ms can be emulated")
    launch = [sys.executable, "-m", "launcher", "run", str(QUICKSTART), "--set", "emulation.rate_mbit=50", *args,
              "--out", str(tmp_path)]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(launch, cwd=ROOT, env=private_ray_env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr[-2000:]
    for text in expected:
        assert text in done.stderr
    assert time.perf_counter() - started < 15
    assert list(tmp_path.iterdir()) == [] and ray_started(private_ray_env) == []
    assert "-probe" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_a_link_off_its_target_fails_the_run_with_the_figures_before_training(support, tmp_path, private_ray_env):
    """100 Gbit/s: several times what this machine's sockets carry (10-15 Gbit/s here), so the links are off."""
    launch = emulated_run(tmp_path, "emulation.rate_mbit=100000")
    done = subprocess.run(launch, cwd=ROOT, env=private_ray_env, capture_output=True, text=True, timeout=150)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "more than 20% off their targets" in done.stderr and "peer 0 upload: " in done.stderr
    (run_dir,) = tmp_path.iterdir()
    links = pd.read_csv(run_dir / "links.csv")
    assert not links.within_tolerance.any() and (links.up_mbit < 80_000).all()
    assert "peer 0 is up" not in done.stderr, "no peer started"
    assert not (run_dir / "metrics.csv").exists() or len(pd.read_csv(run_dir / "metrics.csv")) == 0
    assert system_leftovers(links.namespace[0].split("-")[1]) == []


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_ctrl_c_removes_the_namespaces_too(support, tmp_path, private_ray_env):
    log = (tmp_path / "log.txt").open("w")
    launch = emulated_run(tmp_path / "out", "optim.epochs=60", "emulation.rate_mbit=50")
    proc = subprocess.Popen(launch, cwd=ROOT, env=private_ray_env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    try:
        wait_for_rows(tmp_path / "out", at_least=2, timeout=120)  # training, in the namespaces
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=90) == 130
    finally:
        proc.kill()
    (links,) = (tmp_path / "out").glob("*/links.csv")
    token = pd.read_csv(links).namespace[0].split("-")[1]
    assert system_leftovers(token) == [], "namespaces, veths or the bridge left behind after Ctrl-C"


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_a_sigkilled_driver_leaves_no_namespace(support, tmp_path, private_ray_env):
    """The driver is killed with SIGKILL (no teardown runs): its reaper, a process of its own session waiting for the
    driver's end, deletes the run's namespaces at once, not at the next emulated run."""
    log = (tmp_path / "log.txt").open("w")
    launch = emulated_run(tmp_path / "out", "optim.epochs=60", "emulation.rate_mbit=50")
    proc = subprocess.Popen(launch, cwd=ROOT, env=private_ray_env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    try:
        wait_for_rows(tmp_path / "out", at_least=2, timeout=120)
        (links,) = (tmp_path / "out").glob("*/links.csv")
        token = pd.read_csv(links).namespace[0].split("-")[1]
        assert system_leftovers(token), "the run's namespaces are there while it trains"
        os.kill(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while system_leftovers(token) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert system_leftovers(token) == [], "namespaces left behind by a SIGKILLed driver"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the run's Ray and peers (its process group)


def test_namespaces_of_dead_runs_are_recognised_by_the_pid_in_their_token():
    from launcher.emulation.links import orphaned_namespaces, owned_token

    token = owned_token()
    assert len(token) == 8 and int(token[:6], 16) == os.getpid() & 0xFFFFFF
    names = [f"gossip-{token}-hub", f"gossip-{token}-p0", "gossip-0000ff12-hub", "gossip-0000ff12-p3",
             f"gossip-{token}-probe", "gossip-0000ff13-probe", "other-ns"]  # fmt: skip
    alive = {os.getpid()}.__contains__
    assert orphaned_namespaces(names, alive) == ["gossip-0000ff12-hub", "gossip-0000ff12-p3", "gossip-0000ff13-probe"]
