"""How peers average: hivemind's rounds (gossip, diloco), push-sum (sgp), the all-reduce baseline, hivemind.Optimizer.

Imported before any of them imports hivemind, to cut what hivemind costs a peer's start-up (measured in one process,
docs/performance.md). hivemind's load balancing imports scipy.optimize at its top (0.4 s of CPU, more than half of
`import hivemind`) for a linear program that it solves only for peers that declare a bandwidth, which this project's
never do: it is loaded on first use instead, unchanged where something does use it. (The standard library's
LazyLoader does not serve here: on Python 3.11 the import statement itself reads the module's __spec__, which loads
it.)"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types

import torch.multiprocessing


class Deferred(types.ModuleType):
    """Stands in sys.modules for a module not loaded yet; the first attribute it lacks loads the module, which then
    takes its place (in sys.modules and as its parent package's attribute) and answers. Dunder names never load it
    (inspect, for one, reads every module's __file__)."""

    def __getattr__(self, attribute: str):
        if attribute.startswith("__") and attribute.endswith("__"):
            raise AttributeError(attribute)
        name = self.__name__
        if sys.modules.get(name) is self:
            del sys.modules[name]
        module = importlib.import_module(name)
        parent, _, child = name.rpartition(".")
        setattr(sys.modules[parent], child, module)
        return getattr(module, attribute)


def import_on_first_use(name: str) -> None:
    """`import name` (a submodule) from here on binds a stand-in that loads it on first use; nothing changes where it
    was imported already, or where it is not installed."""
    if name in sys.modules or (spec := importlib.util.find_spec(name)) is None:
        return
    stand_in = sys.modules[name] = Deferred(name)
    stand_in.__spec__, stand_in.__file__ = spec, spec.origin  # (the import statement reads __spec__)
    stand_in.__path__ = spec.submodule_search_locations or []
    parent, _, child = name.rpartition(".")
    setattr(sys.modules[parent], child, stand_in)


import_on_first_use("scipy.optimize")

# hivemind sets torch's sharing strategy to file_system unless told otherwise: every peer then starts a
# torch_shm_manager (0.2 s of CPU) and its DHT waits for it (0.56 -> 0.26 s to come up). file_descriptor is torch's own
# default on Linux; its descriptors stay few (the flat buffers; a state download's tensors while they are received)
if "file_descriptor" in torch.multiprocessing.get_all_sharing_strategies():
    os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor")
