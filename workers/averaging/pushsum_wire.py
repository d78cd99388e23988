"""Push-sum's wire format: one libp2p stream per message, on the peer's own client of its DHT's p2pd.

A message is [u32 length][msgpack header {k, w, proof, numel, parts}] then `parts` frames [u32 length][hivemind's
runtime_pb2.Tensor of at most PART_NUMEL values of the flattened parameters, under the run's codec], answered by the
receiver with one status byte and its latest round (i64, -1: none yet). A binary stream with this framing cost ~1.6 +
1.7 ms of CPU (sender + receiver, p2pd included) per 0.25 MB message, against ~2.5 + 2.5 ms for hivemind's protobuf
stream and ~2.0 + 2.5 ms for a unary call over the same connection (measured with the prototype,
/work/proto/sgp/bench_transport.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass

import torch
from hivemind.compression import CompressionBase, CompressionInfo, deserialize_torch_tensor
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils.serializer import MSGPackSerializer

logger = logging.getLogger(__name__)

PART_NUMEL = 2**20  # values per part frame (4 MiB of float32): bounded frames for large models
PART_LIMIT = PART_NUMEL * 8 + 1024  # the largest part frame a receiver reads (float64 values and their framing)
LEN_BYTES = 4
HEADER_MAX = 4096

# the receiver's answer, one byte (and its round); then the sender's own outcomes: no stream (nothing left), no answer
# (maybe applied)
ROUND_BYTES = 8
ACCEPTED, STRANGER, NOT_FINITE, LATE, MALFORMED, DUPLICATE, CLOSED = range(1, 8)
UNREACHABLE, TIMED_OUT = -1, -2
STATUS = {ACCEPTED: "accepted", STRANGER: "stranger", NOT_FINITE: "not finite", LATE: "late", MALFORMED: "malformed",
          DUPLICATE: "duplicate", CLOSED: "closed", UNREACHABLE: "unreachable", TIMED_OUT: "timed out"}  # fmt: skip


@dataclass
class SendOutcome:
    status: int
    nbytes: int  # what left this peer: header and frames
    seconds: float
    round: int = -1  # the receiver's latest round, as it answered (-1: no answer, or no round yet)

    @property
    def taken_back(self) -> bool:
        """The message provably did not land (no stream, or the receiver refused it): the sender keeps its mass."""
        return self.status not in (ACCEPTED, TIMED_OUT)


def write_frame(writer: asyncio.StreamWriter, data: bytes) -> int:
    writer.write(len(data).to_bytes(LEN_BYTES, "big"))
    writer.write(data)
    return LEN_BYTES + len(data)


async def read_frame(reader: asyncio.StreamReader, limit: int, timeout: float) -> bytes:
    length = int.from_bytes(await asyncio.wait_for(reader.readexactly(LEN_BYTES), timeout), "big")
    if length > limit:
        raise ValueError(f"frame of {length} bytes, at most {limit}")
    return await asyncio.wait_for(reader.readexactly(length), timeout)


def part_count(numel: int, part_numel: int = PART_NUMEL) -> int:
    return max(1, math.ceil(numel / part_numel))


async def push(p2p: P2P, peer: PeerID, handler: str, *, k: int, weight: float, flat: torch.Tensor,
               proof: bytes | None, codec: CompressionBase, timeout: float = 5.0) -> SendOutcome:  # fmt: skip
    """Send one push-sum message (`flat`: a CPU tensor); UNREACHABLE if no stream opened, TIMED_OUT if the answer did
    not come (it may have been applied), else the receiver's status byte and round."""
    started = time.perf_counter()
    try:
        _, reader, writer = await asyncio.wait_for(p2p.call_binary_stream_handler(peer, handler), timeout)
    except Exception as err:  # noqa: BLE001 (dial failed, no such handler, daemon gone: nothing was sent)
        logger.debug("push-sum: no stream to %s: %r", peer, err)
        return SendOutcome(UNREACHABLE, 0, time.perf_counter() - started)
    nbytes, round_ = 0, -1
    try:
        parts = part_count(flat.numel())
        header = {"k": k, "w": float(weight), "proof": proof or b"", "numel": flat.numel(), "parts": parts}
        nbytes += write_frame(writer, MSGPackSerializer.dumps(header))
        with contextlib.suppress(ConnectionError):  # a receiver that refused after the header closes early
            for index in range(parts):
                chunk = flat[index * PART_NUMEL : (index + 1) * PART_NUMEL]
                part = codec.compress(chunk, CompressionInfo.from_tensor(chunk))
                nbytes += write_frame(writer, part.SerializeToString())
                await asyncio.wait_for(writer.drain(), timeout)
        answered = await asyncio.wait_for(reader.readexactly(1 + ROUND_BYTES), timeout)
        status, round_ = answered[0], int.from_bytes(answered[1:], "big", signed=True)
    except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, OSError):
        status = TIMED_OUT
    finally:
        writer.close()
    return SendOutcome(status, nbytes, time.perf_counter() - started, round_)


async def read_parts(reader: asyncio.StreamReader, parts: int, dtype: torch.dtype, timeout: float,
                     ) -> tuple[torch.Tensor, int]:  # fmt: skip
    """A message's parts after its header, as one flat tensor of `dtype`, and their bytes."""
    nbytes, found = 0, []
    for _ in range(parts):
        data = await read_frame(reader, PART_LIMIT, timeout)
        nbytes += len(data)
        found.append(deserialize_torch_tensor(runtime_pb2.Tensor.FromString(data)).reshape(-1).to(dtype))
    return (torch.cat(found) if len(found) > 1 else found[0]), nbytes


async def skip_parts(reader: asyncio.StreamReader, parts: int, timeout: float) -> None:
    """Read and drop a refused message's parts, so that the sender, done writing, reads the answer."""
    with contextlib.suppress(Exception):  # (the sender gave up, or sent something else: it gets what it gets)
        for _ in range(parts):
            await read_frame(reader, PART_LIMIT, timeout)


async def answer(writer: asyncio.StreamWriter, status: int, timeout: float, round_: int = -1) -> None:
    try:
        writer.write(bytes([status]) + round_.to_bytes(ROUND_BYTES, "big", signed=True))
        await asyncio.wait_for(writer.drain(), timeout)
    except Exception:  # noqa: BLE001 (the sender is gone)
        pass
    finally:
        writer.close()
