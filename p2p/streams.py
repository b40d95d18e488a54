"""What every peer stream shares: the faults a remote peer can cause, exact reads, quiet closes, and
the one guard around every stream handler (ban check, request timeout, close, fault accounting)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from typing import TypeVar

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import StreamHandlerFn, TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.peer.id import ID

from p2p import wire
from p2p.scoring import PeerEvent, PeerScores

log = logging.getLogger(__name__)

Request = TypeVar("Request")

# Failures that a remote peer can cause on a stream; each one is that peer's fault, never ours.
PEER_FAULTS: tuple[type[BaseException], ...] = (
    BaseLibp2pError,
    trio.TooSlowError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    OSError,
    EOFError,
    wire.WireFormatError,
)


async def read_exactly(stream: INetStream, num_bytes: int) -> bytes:
    buffer = bytearray()
    while len(buffer) < num_bytes:
        chunk = await stream.read(num_bytes - len(buffer))
        if not chunk:
            raise EOFError(f"stream ended after {len(buffer)} of {num_bytes} bytes")
        buffer += chunk
    if len(buffer) != num_bytes:
        raise wire.WireFormatError(f"a read of {num_bytes} bytes returned {len(buffer)}")
    return bytes(buffer)


async def read_hashes(stream: INetStream) -> list[bytes]:
    """A length-prefixed list of blob hashes (a have query or its answer)."""
    prefix = await read_exactly(stream, wire.LENGTH_PREFIX_BYTES)
    num_hashes = wire.decode_num_hashes(prefix)
    return wire.decode_hashes(prefix + await read_exactly(stream, num_hashes * wire.HASH_BYTES))


async def read_peer_list(stream: INetStream) -> list[wire.PeerRecord]:
    length = wire.decode_peer_list_length(await read_exactly(stream, wire.LENGTH_PREFIX_BYTES))
    return wire.decode_peer_list_body(await read_exactly(stream, length))


async def close_quietly(stream: INetStream) -> None:
    with suppress(*PEER_FAULTS):
        await stream.close()


@asynccontextmanager
async def open_stream(host: IHost, peer: ID, protocol: str) -> AsyncIterator[INetStream]:
    """A stream to a peer, closed (quietly) on the way out; the caller bounds the time."""
    stream = await host.new_stream(peer, [TProtocol(protocol)])
    try:
        yield stream
    finally:
        await close_quietly(stream)


class StreamGuard:
    """The one wrapper of every stream handler: a banned peer's stream is reset unread; the request
    is read within request_timeout_s; a malformed frame costs the sender JUNK_MESSAGE; any other
    fault the peer causes is logged; the stream is closed however the handler ends."""

    def __init__(self, scores: PeerScores, record: Callable[[str, PeerEvent], None], request_timeout_s: float) -> None:
        self._scores = scores
        self._record = record
        self._request_timeout_s = request_timeout_s

    def handler(
        self,
        what: str,
        read_request: Callable[[INetStream], Awaitable[Request]],
        answer: Callable[[INetStream, str, Request], Awaitable[None]],
    ) -> StreamHandlerFn:
        """A libp2p stream handler that reads the request, then answers it (given the peer id)."""

        async def guarded(stream: INetStream) -> None:
            peer_id = stream.muxed_conn.peer_id.to_base58()
            try:
                if self._scores.is_banned(peer_id):
                    await stream.reset()
                    return
                with trio.fail_after(self._request_timeout_s):
                    request = await read_request(stream)
                await answer(stream, peer_id, request)
            except wire.WireFormatError:
                self._record(peer_id, PeerEvent.JUNK_MESSAGE)
            except PEER_FAULTS as error:
                log.debug("%s with %s failed: %s", what, peer_id, error)
            finally:
                await close_quietly(stream)

        return guarded
