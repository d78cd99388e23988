"""One emulated link measured with real sockets: a TCP connection from the peer's namespace to the hub's (which is not
shaped), a few round trips, then a few MB up and a few MB down.

Rates are TCP payload, what the peers' messages get: about 4% under the wire rate the shaper counts (headers).
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

from workers.core.netns import socket_in

MEASURE_S = 0.5  # of data at the target rate per direction...
MIN_BYTES, MAX_BYTES = 256 << 10, 32 << 20  # ...within these bounds
ROUND_TRIPS = 10  # the RTT is their fastest (one more first, to warm up)
STEADY_FROM = 0.25  # a rate is taken once this share of the bytes is in: TCP's slow start is no part of the link
TIMEOUT_S = 60.0
CHUNK = 64 << 10
SOCKET_BUFFER = 8 << 20
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33  # asm-generic/socket.h (not in Python's socket module)


@dataclass(frozen=True)
class Measured:
    up_mbit: float
    down_mbit: float
    rtt_ms: float  # twice the round trip to the hub, which adds no delay: the RTT between two peers of this link


def probe_bytes(rate_mbit: float, rtt_ms: float) -> int:
    """How much to send over a link of `rate_mbit`: MEASURE_S worth (20 round trips at least, for slow start)."""
    seconds = max(MEASURE_S, 20 * rtt_ms / 1e3)
    return int(min(MAX_BYTES, max(MIN_BYTES, rate_mbit * 1e6 / 8 * seconds)))


def steady_rate_mbit(samples: list[tuple[float, int]], skip: float = STEADY_FROM) -> float:
    """Mbit/s of a transfer from its receiver's samples ((time, bytes so far) after each read): from the first
    sample with `skip` of the bytes in, to the last."""
    end, total = samples[-1]
    start, before = next((t, got) for t, got in samples if got >= skip * total)
    return (total - before) * 8 / (end - start) / 1e6 if end > start else float("inf")


def measure_link(hub_ns: str, hub_ip: str, peer_ns: str, up_mbit: float, down_mbit: float, rtt_ms: float) -> Measured:
    """The link between `peer_ns` and the hub: its RTT, upload and download (the targets size the transfers)."""
    peer_end, hub_end = connect(hub_ns, hub_ip, peer_ns)
    with peer_end, hub_end:
        rtt = round_trip_ms(peer_end, hub_end)
        up = transfer_mbit(peer_end, hub_end, probe_bytes(up_mbit, rtt_ms))
        down = transfer_mbit(hub_end, peer_end, probe_bytes(down_mbit, rtt_ms))
    return Measured(up, down, 2 * rtt)


def connect(hub_ns: str, hub_ip: str, peer_ns: str) -> tuple[socket.socket, socket.socket]:
    """(peer's end, hub's end) of one TCP connection between the two namespaces."""
    with socket_in(hub_ns) as listener:
        listener.bind((hub_ip, 0))
        listener.listen(1)
        peer_end = socket_in(peer_ns)
        peer_end.settimeout(TIMEOUT_S)
        peer_end.connect(listener.getsockname())
        listener.settimeout(TIMEOUT_S)
        hub_end, _ = listener.accept()
    for end in (peer_end, hub_end):
        end.settimeout(TIMEOUT_S)
        end.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _large_buffers(end)
    return peer_end, hub_end


def _large_buffers(sock: socket.socket) -> None:
    """Buffers that hold a good part of a second of the link: a sender or receiver thread that a busy machine (or
    the GIL) holds up for a moment must not leave the link idle, or the link would be measured slower than it is.
    The *FORCE options pass net.core.[rw]mem_max (we are root); the plain ones are the fallback."""
    for force, plain in ((SO_SNDBUFFORCE, socket.SO_SNDBUF), (SO_RCVBUFFORCE, socket.SO_RCVBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER)


def round_trip_ms(near: socket.socket, far: socket.socket) -> float:
    """Milliseconds of a byte from `near` to `far` and back: the fastest of ROUND_TRIPS (a path's RTT is its floor;
    the GIL and busy cores only add: 16 links measured at once gave medians of 2-6 ms on links with no delay)."""
    times = []
    for _ in range(ROUND_TRIPS + 1):
        started = time.perf_counter()
        near.sendall(b"x")
        far.sendall(_recv_exactly(far, 1))
        _recv_exactly(near, 1)
        times.append(time.perf_counter() - started)
    return min(times[1:]) * 1e3


def transfer_mbit(sender: socket.socket, receiver: socket.socket, size: int) -> float:
    """Send `size` bytes from a thread, receive them here; the steady rate in Mbit/s."""
    failed: list[BaseException] = []
    thread = threading.Thread(target=_send_zeros, args=(sender, size, failed), daemon=True)
    thread.start()
    buffer, got, samples = bytearray(1 << 20), 0, []
    while got < size:
        read = receiver.recv_into(buffer, min(len(buffer), size - got))
        if not read:
            break
        got += read
        samples.append((time.perf_counter(), got))
    thread.join(TIMEOUT_S)
    if failed or got < size:
        raise OSError(f"link measurement: {got} of {size} bytes arrived" + (f" ({failed[0]})" if failed else ""))
    return steady_rate_mbit(samples)


def _send_zeros(sock: socket.socket, size: int, failed: list[BaseException]) -> None:
    chunk, sent = memoryview(bytes(CHUNK)), 0
    try:
        while sent < size:
            part = min(CHUNK, size - sent)
            sock.sendall(chunk[:part])
            sent += part
    except OSError as err:
        failed.append(err)


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        more = sock.recv(size - len(data))
        if not more:
            raise OSError("link measurement: the connection closed")
        data += more
    return data
