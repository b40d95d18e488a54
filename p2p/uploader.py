"""The uploader: serving blobs to peers within upload slots and a byte rate, super-seeding on a seed,
and answering have queries."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol

from p2p import wire
from p2p.holdings import Holdings
from p2p.settings import BlobSource, P2PSettings
from p2p.streams import StreamGuard, read_exactly, read_hashes
from p2p.throttle import UploadThrottle

UPLOAD_QUEUE_WAIT_S = 1.0
MAX_QUEUED_PER_UPLOAD_SLOT = 2


@dataclass
class EgressCounters:
    bytes_sent_total: int
    bytes_sent_by_blob: dict[bytes, int]


async def acquire_within(lock: trio.Lock | trio.Semaphore, timeout_s: float, refuse: bool = False) -> bool:
    """Wait up to timeout_s for the lock or semaphore (queueing is cheaper than the asker
    polling); False at once when `refuse`, or when the wait runs out."""
    if refuse:
        return False
    with trio.move_on_after(timeout_s):
        await lock.acquire()
        return True
    return False


async def _read_blob_request(stream: INetStream) -> wire.BlobRequest:
    return wire.decode_blob_request(await read_exactly(stream, wire.BLOB_REQUEST_BYTES))


class Uploader:
    """Serves the blobs `holdings` holds (bytes from blob_source) on the blob protocol, resumable at
    an offset: at most max_concurrent_uploads at once (a few more queue briefly, the rest hear BUSY),
    all paced together to upload_bytes_per_s. A seed super-seeds: it sends each blob, from its
    start, to origin_copies_per_blob peers and one blob per peer at a time, and answers ELSEWHERE
    to the others (who fetch it from those peers) unless they ask as a last resort. Also answers
    have queries, and counts the bytes sent per blob (egress)."""

    def __init__(
        self, settings: P2PSettings, guard: StreamGuard, holdings: Holdings, *, blob_source: BlobSource, is_seed: bool
    ) -> None:
        self._settings = settings
        self._guard = guard
        self._holdings = holdings
        self._blob_source = blob_source
        self._is_seed = is_seed
        self.bytes_sent_by_blob: Counter[bytes] = Counter()
        self._origin_copies: Counter[bytes] = Counter()
        self._seeding_turns: defaultdict[str, trio.Lock] = defaultdict(trio.Lock)
        self._upload_slots = trio.Semaphore(settings.max_concurrent_uploads)
        self._throttle: UploadThrottle | None = None

    def open(self, host: IHost) -> None:
        """Serve the blob and have protocols on the host (from within its trio run)."""
        self._throttle = UploadThrottle(self._settings.upload_bytes_per_s, burst_bytes=self._settings.chunk_bytes)
        blob_handler = self._guard.handler("serving a blob", _read_blob_request, self._serve_blob)
        host.set_stream_handler(TProtocol(wire.BLOB_PROTOCOL), blob_handler)
        have_handler = self._guard.handler("answering a have query", read_hashes, self._answer_have)
        host.set_stream_handler(TProtocol(wire.HAVE_PROTOCOL), have_handler)

    def egress(self) -> EgressCounters:
        return EgressCounters(sum(self.bytes_sent_by_blob.values()), dict(self.bytes_sent_by_blob))

    async def _answer_have(self, stream: INetStream, peer_id: str, asked: list[bytes]) -> None:
        await stream.write(wire.encode_hashes([h for h in asked if h in self._holdings.held]))

    async def _serve_blob(self, stream: INetStream, peer_id: str, request: wire.BlobRequest) -> None:
        if self._seeded_elsewhere(request):
            await stream.write(wire.encode_blob_response_header(wire.BlobStatus.ELSEWHERE, 0))
            return
        seeding = self._is_seed and request.offset == 0
        # A seed sends one blob per peer at a time: while a peer waits its turn, other peers
        # take the other blobs, so the first copies land on different peers.
        turn = self._seeding_turns[peer_id] if seeding and not request.last_resort else None
        if turn is not None and not await acquire_within(turn, UPLOAD_QUEUE_WAIT_S):
            await stream.write(wire.encode_blob_response_header(wire.BlobStatus.BUSY, 0))
            return
        try:
            await self._serve_in_slot(stream, request, seeding)
        finally:
            if turn is not None:
                turn.release()

    async def _serve_in_slot(self, stream: INetStream, request: wire.BlobRequest, seeding: bool) -> None:
        if not await acquire_within(self._upload_slots, UPLOAD_QUEUE_WAIT_S, self._queue_is_full()):
            await stream.write(wire.encode_blob_response_header(wire.BlobStatus.BUSY, 0))
            return
        try:
            if self._seeded_elsewhere(request):  # seeded to another peer while this one queued
                await stream.write(wire.encode_blob_response_header(wire.BlobStatus.ELSEWHERE, 0))
                return
            self._origin_copies[request.blob_hash] += seeding
            completed = False
            try:
                completed = await self._upload(stream, request.blob_hash, request.offset)
            finally:
                self._origin_copies[request.blob_hash] -= seeding and not completed
        finally:
            self._upload_slots.release()

    def _seeded_elsewhere(self, request: wire.BlobRequest) -> bool:
        """A seed sends each blob to origin_copies_per_blob peers; the rest fetch it from them."""
        return (
            self._is_seed
            and request.offset == 0
            and not request.last_resort
            and self._origin_copies[request.blob_hash] >= self._settings.origin_copies_per_blob
        )

    def _queue_is_full(self) -> bool:
        num_waiting = self._upload_slots.statistics().tasks_waiting
        return num_waiting >= MAX_QUEUED_PER_UPLOAD_SLOT * self._settings.max_concurrent_uploads

    async def _upload(self, stream: INetStream, blob_hash: bytes, offset: int) -> bool:
        """Send the blob from offset on; True when all of it went out."""
        assert self._throttle is not None, "the uploader is not open"
        data = await trio.to_thread.run_sync(self._blob_source, blob_hash)
        if data is None:
            await stream.write(wire.encode_blob_response_header(wire.BlobStatus.NOT_FOUND, 0))
            return False
        if offset > len(data):
            await stream.write(wire.encode_blob_response_header(wire.BlobStatus.BAD_REQUEST, len(data)))
            return False
        await stream.write(wire.encode_blob_response_header(wire.BlobStatus.OK, len(data)))
        view = memoryview(data)
        for start in range(offset, len(data), self._settings.chunk_bytes):
            chunk = view[start : start + self._settings.chunk_bytes]
            await self._throttle.pace(len(chunk))
            with trio.fail_after(self._settings.stall_timeout_s):
                await stream.write(bytes(chunk))
            self.bytes_sent_by_blob[blob_hash] += len(chunk)
        return True
