"""The Ray driver of gossip-launcher (`gossip-launch`, `python -m launcher`)."""

import os

# Ray's C++ failure-signal handler takes SIGTERM in the driver, and `ray.shutdown()` puts SIGTERM back to its default
# action (death) a second before it has stopped the local raylet and GCS: a SIGTERM during the cleanup would kill the
# driver halfway (workers/core/signals.py). Ray reads this when it is imported, so it is set before any launcher module
# imports Ray; `connect_ray` takes it out of the environment again, so the local Ray and the peers keep the handler.
_NO_SIGNAL_HANDLER = "RAY_DISABLE_FAILURE_SIGNAL_HANDLER"
DRIVER_ONLY_ENV = {} if _NO_SIGNAL_HANDLER in os.environ else {_NO_SIGNAL_HANDLER: "1"}
os.environ.update(DRIVER_ONLY_ENV)
