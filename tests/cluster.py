"""A private multi-node Ray cluster on this one machine, for integration tests.

Each node is a `ray start --block` child process (a head and workers that each advertise their own custom resource),
with token authentication on (a random token per cluster, passed as RAY_AUTH_MODE=token + RAY_AUTH_TOKEN) unless
asked otherwise, ports
picked free at runtime, and a short private temp dir. Other Ray clusters may run on the same machine at the same
time: teardown stops only this cluster's processes (never `ray stop`, which stops every Ray on the machine). Every
process of the cluster (raylets, workers, hivemind's p2pd, a driver started with `client_env()`) inherits the
environment variable CLUSTER_MARKER, which is how teardown finds them, including those that were re-parented; and
each `ray start --block` gets SIGTERM (and stops its node) if the test process dies.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil

BIN_DIR = Path(sys.executable).parent  # `ray`, `gossip-launch` of this venv
CLUSTER_MARKER = "GOSSIP_TEST_CLUSTER"
STARTED_LINE = "Ray runtime started"
PR_SET_PDEATHSIG = 1  # prctl(2)
WORKER_PORTS_PER_NODE = 64
# Below the kernel's ephemeral range (32768+), so ports the OS hands out (p2pd, clients) do not land in it.
WORKER_PORT_RANGE = (20000, 32000)


@dataclass
class RayNode:
    name: str  # "head", or the custom resource the node advertises
    resources: dict[str, float]
    process: subprocess.Popen
    log_path: Path

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class LocalCluster:
    name: str  # also the temp dir's name and the value of CLUSTER_MARKER
    temp_dir: Path
    token: str  # "": token authentication off (RAY_AUTH_MODE=disabled)
    gcs_address: str  # host:port, what `ray start --address` and `ray.init(address=...)` take
    dashboard_url: str | None  # http://127.0.0.1:port, what `ray job submit --address` takes
    nodes: list[RayNode] = field(default_factory=list)
    node_ids: dict[str, str] = field(default_factory=dict)  # node name -> Ray node id (hex)
    worker_port_starts: list[int] = field(default_factory=list)  # each node's own range of worker ports

    def client_env(self) -> dict[str, str]:
        """The environment of a client of this cluster (a node, a driver, `ray job ...`): it holds the token."""
        auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token} if self.token else {"RAY_AUTH_MODE": "disabled"}
        return {**ray_free_environ(self.name), **auth}

    def outsider_env(self, home: Path, token: str | None = None) -> dict[str, str]:
        """The environment of a client without the cluster's token: none at all (no RAY_AUTH_MODE, and `home` is an
        empty folder, so no ~/.ray/auth_token is found either), or `token` instead of the cluster's."""
        env = {**ray_free_environ(self.name), "HOME": str(home)}
        if token is not None:
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
        return env

    def processes(self) -> list[psutil.Process]:
        return cluster_processes(self.name, self.temp_dir)


def ray_free_environ(marker: str) -> dict[str, str]:
    """This process's environment without any RAY_* setting (a RAY_ADDRESS or token of another cluster), this venv's
    bin first on PATH, and the cluster's marker."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env["PATH"] = f"{BIN_DIR}{os.pathsep}{env.get('PATH', '')}"
    env.update({CLUSTER_MARKER: marker, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"})
    return env


@contextmanager
def local_cluster(
    workers: dict[str, dict[str, float]],
    head_cpus: int = 1,
    worker_cpus: int = 2,
    dashboard: bool = False,
    start_timeout: float = 60.0,
    token_auth: bool = True,
) -> Iterator[LocalCluster]:
    """A head node plus one worker node per entry of `workers` (name -> its custom resources), all running; on exit
    every process of the cluster is stopped and the temp dir removed. Raises `LeftoverProcesses` if any survive.
    `token_auth=False`: a cluster that lets any client in, as `ray start` makes one when no token is at hand."""
    name = f"glc_{secrets.token_hex(3)}"
    temp_dir = Path("/tmp") / name  # short: Unix socket paths below it must stay under ~107 characters
    temp_dir.mkdir()
    token = secrets.token_hex(32) if token_auth else ""
    cluster = LocalCluster(name, temp_dir, token=token, gcs_address="", dashboard_url=None)
    with ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, temp_dir, ignore_errors=True)
        cleanup.callback(stop_cluster, cluster)
        start_head(cluster, head_cpus, dashboard, start_timeout)
        for node_name, resources in workers.items():  # one after the other: a loaded machine starts them faster
            wait_started(start_worker(cluster, node_name, resources, worker_cpus), start_timeout)
        cluster.node_ids = wait_for_nodes(cluster, start_timeout)
        yield cluster


def start_head(cluster: LocalCluster, num_cpus: int, dashboard: bool, timeout: float) -> None:
    gcs_port, dashboard_port, client_port = free_ports(3)
    args = ["--head", f"--port={gcs_port}", f"--ray-client-server-port={client_port}"]
    if dashboard:
        args += ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}"]
        cluster.dashboard_url = f"http://127.0.0.1:{dashboard_port}"
    else:
        args += ["--include-dashboard=false"]
    head = start_node(cluster, "head", args, {}, num_cpus)
    # `ray start` writes the GCS address (with the IP it chose: 127.0.0.1 becomes the machine's address) here, in
    # the temp dir we gave it (not in /tmp/ray, where `ray.init(address="auto")` of other clusters looks).
    address_file = cluster.temp_dir / "ray_current_cluster"
    wait_until(head, lambda: address_file.exists() and address_file.read_text().strip(), timeout)
    cluster.gcs_address = address_file.read_text().strip()


def start_worker(cluster: LocalCluster, name: str, resources: dict[str, float], num_cpus: int) -> RayNode:
    # One log monitor per machine is enough (the head's); more would print every worker's output twice.
    args = [f"--address={cluster.gcs_address}", "--include-log-monitor=false"]
    return start_node(cluster, name, args, resources, num_cpus)


def start_node(cluster: LocalCluster, name: str, args: list[str], resources: dict, num_cpus: int) -> RayNode:
    node_manager, object_manager, agent_http, agent_grpc, runtime_env_agent, metrics = free_ports(6)
    min_worker_port = free_port_range(WORKER_PORTS_PER_NODE, taken=cluster.worker_port_starts)
    cluster.worker_port_starts.append(min_worker_port)
    command = [
        str(BIN_DIR / "ray"), "start", "--block", *args,
        f"--temp-dir={cluster.temp_dir}", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
        f"--num-cpus={num_cpus}", "--num-gpus=0", f"--resources={json.dumps(resources)}",
        f"--object-store-memory={100 * 1024**2}",
        f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
        f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={runtime_env_agent}", f"--metrics-export-port={metrics}",
        f"--min-worker-port={min_worker_port}", f"--max-worker-port={min_worker_port + WORKER_PORTS_PER_NODE - 1}",
    ]  # fmt: skip
    log_path = cluster.temp_dir / f"ray-start-{name}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=cluster.client_env(), start_new_session=True,  # a Ctrl-C in pytest does not reach the nodes
            preexec_fn=stop_when_parent_dies,
        )  # fmt: skip
    node = RayNode(name, resources, process, log_path)
    cluster.nodes.append(node)
    return node


def stop_when_parent_dies() -> None:
    """In the child, before exec: SIGTERM when the test process dies (even by SIGKILL), so that `ray start --block`
    still stops its node; Linux only, elsewhere a no-op."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def wait_until(node: RayNode, condition, timeout: float) -> None:
    """Until `condition()` holds; raises with the node's output if its `ray start` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        if node.process.poll() is not None or time.monotonic() > deadline:
            state = f"exited with {node.process.returncode}" if node.process.poll() is not None else "timed out"
            raise RuntimeError(f"ray start of node {node.name} {state}:\n{node.log_tail()}\n{ray_logs(node)}")
        time.sleep(0.2)


def wait_started(node: RayNode, timeout: float) -> None:
    wait_until(node, lambda: STARTED_LINE in node.log_path.read_text(errors="replace"), timeout)


def ray_logs(node: RayNode, lines: int = 15) -> str:
    """The last lines of the session's raylet and GCS logs (to see why a node did not come up)."""
    tails = []
    for path in sorted(node.log_path.parent.glob("session_*/logs/*")):
        if path.name.startswith(("raylet", "gcs_server")) and path.suffix in (".out", ".err"):
            tails.append(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
    return "\n".join(tails)


# Runs in a client process: waits until every node is alive, prints [{node_id, resources}].
_LIST_NODES = """
import json, sys, time
import ray
expected, deadline = int(sys.argv[2]), time.monotonic() + float(sys.argv[3])
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
while True:
    nodes = [n for n in ray.nodes() if n["Alive"]]
    if len(nodes) >= expected or time.monotonic() > deadline:
        break
    time.sleep(0.5)
print(json.dumps([{"node_id": n["NodeID"], "resources": n["Resources"]} for n in nodes]))
"""


def list_nodes(cluster: LocalCluster, expected: int, timeout: float) -> list[dict]:
    """The cluster's live nodes as a driver connected by address sees them (`ray.nodes()`)."""
    result = subprocess.run(
        [sys.executable, "-c", _LIST_NODES, cluster.gcs_address, str(expected), str(timeout)],
        env=cluster.client_env(), capture_output=True, text=True, timeout=timeout + 60,
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"listing the nodes failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def wait_for_nodes(cluster: LocalCluster, timeout: float) -> dict[str, str]:
    """node name -> node id, once all nodes are alive; a worker is recognized by its own custom resource."""
    nodes = list_nodes(cluster, len(cluster.nodes), timeout)
    ids = {}
    for node in cluster.nodes:
        wanted = node.resources or {"node:__internal_head__": 1.0}
        matches = [n["node_id"] for n in nodes if all(n["resources"].get(k) == v for k, v in wanted.items())]
        if len(matches) != 1:
            raise RuntimeError(f"node {node.name} ({wanted}) is not (or not once) among the live nodes: {nodes}")
        ids[node.name] = matches[0]
    return ids


def stop_cluster(cluster: LocalCluster, grace: float = 15.0) -> None:
    """SIGTERM every `ray start --block` (each stops its node's processes), then SIGKILL whatever of the cluster
    is left; raises LeftoverProcesses if anything survives even that."""
    known = {p.pid: p for p in cluster.processes()}
    for node in reversed(cluster.nodes):  # workers first: a head that goes first leaves them retrying the GCS
        if node.process.poll() is None:
            node.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for node in cluster.nodes:
        try:
            node.process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            node.process.kill()
            node.process.wait()
    leftovers = kill_all(list({**known, **{p.pid: p for p in cluster.processes()}}.values()))
    if leftovers:
        raise LeftoverProcesses(f"cluster {cluster.name}: still running after SIGKILL: {leftovers}")


class LeftoverProcesses(RuntimeError):
    pass


def kill_all(processes, timeout: float = 10.0) -> list[str]:
    """SIGKILL each process; the ones still running after `timeout` (a zombie counts as dead: it only waits for
    its parent, often init, to reap it)."""
    for proc in processes:
        try:
            proc.kill()  # psutil checks it is still the same process (not a reused pid) before signalling
        except psutil.NoSuchProcess:
            pass
    deadline = time.monotonic() + timeout
    while (running := [p for p in processes if is_running(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [describe(p) for p in running]


def is_running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def cluster_processes(marker: str, temp_dir: Path) -> list[psutil.Process]:
    """Live processes that carry the cluster's marker in their environment or its temp dir on their command line
    (zombies excluded: they are dead, their parent has not reaped them yet)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        if proc.pid == os.getpid() or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            if str(temp_dir) in " ".join(proc.info["cmdline"] or []) or proc.environ().get(CLUSTER_MARKER) == marker:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def describe(proc: psutil.Process) -> str:
    try:
        return f"{proc.pid}: {' '.join(proc.cmdline())[:150]}"
    except psutil.Error:
        return str(proc.pid)


def free_ports(count: int) -> list[int]:
    """Ports nobody listens on now, all different (the sockets stay open until all are chosen)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port_range(size: int, taken: list[int], attempts: int = 50) -> int:
    """The first port of `size` consecutive free ports in WORKER_PORT_RANGE, at a random place, not overlapping the
    ranges of the same size that start at `taken`."""
    low, high = WORKER_PORT_RANGE
    for _ in range(attempts):
        start = random.randrange(low, high - size)
        overlaps = any(abs(start - other) < size for other in taken)
        if not overlaps and all(port_is_free(port) for port in range(start, start + size)):
            return start
    raise RuntimeError(f"no {size} consecutive free ports in {WORKER_PORT_RANGE}")


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("", port))
        except OSError:
            return False
    return True
