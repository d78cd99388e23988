"""resources.cap_cpu: a real cgroup CPU quota on a real busy process (root and a cgroup cpu controller needed: the
project's machines have both; elsewhere the test says why it cannot run)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time

import psutil
import pytest

from workers.core.cpucap import BASE, cap_this_process, cpu_hierarchy, remove_caps, set_quota

pytestmark = pytest.mark.skipif(cpu_hierarchy() is None, reason="no writable cgroup cpu controller (needs root)")

BUSY = """
import sys, time
from workers.core.cpucap import cap_this_process
if sys.argv[1] != "none":
    cap_this_process(sys.argv[1], float(sys.argv[2]))
end = time.time() + 2.0
while time.time() < end:
    pass
"""


def busy_cpu_s(group: str, cores: float) -> float:
    """CPU seconds a process spinning for 2 s of wall time got, in `group` capped at `cores` ("none": uncapped)."""
    proc = subprocess.Popen([sys.executable, "-c", BUSY, group, str(cores)])
    process, cpu = psutil.Process(proc.pid), 0.0
    while proc.poll() is None:
        try:
            cpu = sum(process.cpu_times()[:2])
        except psutil.Error:
            break
        time.sleep(0.05)
    assert proc.wait() == 0
    return cpu


def test_a_capped_process_gets_its_share_of_a_core_and_no_more():
    free = busy_cpu_s("none", 0)
    capped = busy_cpu_s("test-cap/peer-0-0", 0.25)
    print(f"2 s of spinning: {free:.2f} CPU-s uncapped, {capped:.2f} capped at a quarter core")
    assert capped <= 0.25 * 2.0 * 1.3 and free >= 2 * capped  # idle machine: 2.0 against 0.5 CPU-s
    remove_caps("test-cap")
    assert not (cpu_hierarchy() / BASE / "test-cap").exists(), "its group is removed once it is empty"


def test_a_quota_set_while_the_process_runs_slows_it_down():
    """A `slow` straggler under resources.cap_cpu: its group's quota divided while it trains."""
    proc = subprocess.Popen([sys.executable, "-c", BUSY, "test-slow/peer-0-0", "0.5"])
    path = cpu_hierarchy() / BASE / "test-slow" / "peer-0-0"
    process = psutil.Process(proc.pid)
    time.sleep(0.5)
    set_quota(path, 0.1)
    cpu = 0.0
    while proc.poll() is None:
        with contextlib.suppress(psutil.Error):
            cpu = sum(process.cpu_times()[:2])
        time.sleep(0.05)
    print(f"2 s of spinning at half a core, then a tenth from 0.5 s on: {cpu:.2f} CPU-s")
    assert cpu <= 0.5 * 0.5 + 0.1 * 1.5 + 0.2, "at most half a core, then a tenth"
    remove_caps("test-slow")


def test_the_group_of_a_live_process_is_kept():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        root = cpu_hierarchy()
        path = root / BASE / "test-keep" / "peer-0-0"
        path.mkdir(parents=True, exist_ok=True)
        (path / "cgroup.procs").write_text(str(proc.pid))
        remove_caps("test-keep", wait_s=0.5)
        assert path.is_dir(), "a group with a live process stays"
    finally:
        proc.kill()
        proc.wait()
    remove_caps("test-keep")  # retried until the killed process has left the group
    assert not (cpu_hierarchy() / BASE / "test-keep").exists()


def test_cap_this_process_names_the_setting_when_it_cannot(monkeypatch):
    import workers.core.cpucap as cpucap

    monkeypatch.setattr(cpucap, "cpu_hierarchy", lambda: None)
    with pytest.raises(cpucap.CpuCapError, match="resources.cap_cpu"):
        cap_this_process("x", 0.5)
