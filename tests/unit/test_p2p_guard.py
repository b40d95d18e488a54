"""The one guard around every peer stream handler: ban check, request timeout, close, fault accounting."""

from __future__ import annotations

from dataclasses import dataclass, field

import trio
import trio.testing
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from p2p import wire
from p2p.scoring import PeerEvent, PeerScores
from p2p.streams import StreamGuard, read_exactly

PEER = ID.from_pubkey(create_new_key_pair(bytes(32)).public_key)
TIMEOUT_S = 3.0


@dataclass
class FakeConn:
    peer_id: ID


@dataclass
class FakeStream:
    """A stream whose remote side sends `incoming` and then, unless `stall`, ends it."""

    incoming: bytes = b""
    stall: bool = False
    muxed_conn: FakeConn = field(default_factory=lambda: FakeConn(PEER))
    written: bytearray = field(default_factory=bytearray)
    num_reads: int = 0
    was_reset: bool = False
    was_closed: bool = False

    async def read(self, num_bytes: int) -> bytes:
        self.num_reads += 1
        if not self.incoming and self.stall:
            await trio.sleep_forever()
        chunk, self.incoming = self.incoming[:num_bytes], self.incoming[num_bytes:]
        return chunk

    async def write(self, data: bytes) -> None:
        self.written += data

    async def reset(self) -> None:
        self.was_reset = True

    async def close(self) -> None:
        self.was_closed = True


async def read_request(stream: FakeStream) -> bytes:
    return await read_exactly(stream, 4)


async def echo(stream: FakeStream, peer_id: str, request: bytes) -> None:
    await stream.write(peer_id.encode() + b":" + request)


async def junk(stream: FakeStream, peer_id: str, request: bytes) -> None:
    raise wire.WireFormatError("a malformed frame")


def serve(stream: FakeStream, answer=echo, scores: PeerScores | None = None) -> list[tuple[str, PeerEvent]]:
    scores = scores or PeerScores()
    recorded: list[tuple[str, PeerEvent]] = []
    guard = StreamGuard(scores, lambda peer, event: recorded.append((peer, event)), TIMEOUT_S)
    handler = guard.handler("testing", read_request, answer)
    trio.run(handler, stream, clock=trio.testing.MockClock(autojump_threshold=0))
    return recorded


def test_a_request_is_read_answered_and_the_stream_closed():
    stream = FakeStream(b"ping")
    assert serve(stream) == []
    assert bytes(stream.written) == PEER.to_base58().encode() + b":ping"
    assert stream.was_closed and not stream.was_reset


def test_a_banned_peer_is_reset_unread():
    stream = FakeStream(b"ping")
    scores = PeerScores(banned={PEER.to_base58()})
    assert serve(stream, scores=scores) == []
    assert stream.was_reset and stream.num_reads == 0 and not stream.written
    assert stream.was_closed


def test_a_malformed_frame_costs_the_sender_junk_message():
    stream = FakeStream(b"ping")
    assert serve(stream, answer=junk) == [(PEER.to_base58(), PeerEvent.JUNK_MESSAGE)]
    assert stream.was_closed


def test_a_stalled_or_short_request_is_given_up_without_blame():
    for stream in (FakeStream(b"pi", stall=True), FakeStream(b"pi")):
        assert serve(stream) == []
        assert stream.was_closed and not stream.written
