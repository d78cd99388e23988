"""How peers average: hivemind's rounds (gossip, diloco), push-sum (sgp), the all-reduce baseline, hivemind.Optimizer.

Imports hivemind itself, trimming what that costs a peer's start-up (measured in one process, docs/performance.md):

- hivemind's load balancing imports scipy.optimize at its top (0.4 s of CPU, more than half of `import hivemind`) for
  a linear program that it solves only for peers that declare a bandwidth, which this project's never do. While
  hivemind is imported, a stand-in takes its place, and hivemind keeps the stand-in: its first use loads the real
  module. Anything imported later gets the real module as usual (the stand-in is gone from sys.modules by then). The
  standard library's LazyLoader does not serve here: on Python 3.11 the import statement itself reads the module's
  __spec__, which loads it.
- hivemind sets torch's sharing strategy to file_system unless told otherwise: every peer then starts a
  torch_shm_manager (0.2 s of CPU), and its DHT waits for it (0.56 -> 0.26 s to come up). file_descriptor is torch's
  own default on Linux. A state download sends each tensor's descriptor through a pipe (ResNet-50's state: about 860
  for a moment), so the soft limit on open files is raised to the hard one (a laptop's soft limit is often 1024).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import resource
import sys
import threading
import types

import torch.multiprocessing


class Deferred(types.ModuleType):
    """Stands for a module not loaded yet; the first attribute it lacks loads the module (which takes its place as
    its parent package's attribute) and answers. Dunder names never load it (inspect, for one, reads every
    module's __file__)."""

    _lock = threading.Lock()

    def __getattr__(self, attribute: str):
        if attribute.startswith("__") and attribute.endswith("__"):
            raise AttributeError(attribute)
        name = self.__name__
        parent, _, child = name.rpartition(".")
        with Deferred._lock:  # (the real module's own imports must not find the stand-in: it would wait for itself)
            if sys.modules.get(name) is self:
                del sys.modules[name]
            if getattr(sys.modules[parent], child, None) is self:
                delattr(sys.modules[parent], child)
            module = importlib.import_module(name)
        return getattr(module, attribute)


def import_without(name: str, importing: str) -> None:
    """Import `importing` with a stand-in for the submodule `name` (unless `name` is loaded already or missing)."""
    if name in sys.modules or (spec := importlib.util.find_spec(name)) is None:
        importlib.import_module(importing)
        return
    stand_in = sys.modules[name] = Deferred(name)
    stand_in.__spec__, stand_in.__file__ = spec, spec.origin  # (the import statement reads __spec__)
    parent, _, child = name.rpartition(".")
    setattr(sys.modules[parent], child, stand_in)
    try:
        importlib.import_module(importing)
    finally:
        with Deferred._lock:
            if sys.modules.get(name) is stand_in:
                del sys.modules[name]


def raise_open_files_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 65536
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):  # (a hard limit above the kernel's nr_open)
            pass


if "file_descriptor" in torch.multiprocessing.get_all_sharing_strategies():
    os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor")
    raise_open_files_limit()
import_without("scipy.optimize", importing="hivemind")
