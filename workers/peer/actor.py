"""The Ray actor that hosts one peer. The driver creates actors of this class without importing the peer's own module
(torch, hivemind: seconds of start-up and a GB of memory the driver has no use for): the peer is built in the actor's
process, and the driver calls its methods by name (`Peer`'s: start_dht, join, poll, ...)."""

from __future__ import annotations

from typing import Any


class PeerActor:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from workers.peer.peer import Peer  # in the actor's process only

        self.peer = Peer(*args, **kwargs)

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """`Peer.<method>(*args, **kwargs)` in this actor."""
        return getattr(self.peer, method)(*args, **kwargs)
