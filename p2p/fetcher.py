"""The fetcher: blobs by hash from the peers that hold them, then from the seeds (the origins), then
from the owner's fallback; every blob checked against its hash before it is stored."""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from p2p import wire
from p2p.holdings import Holdings
from p2p.peers import PeerUpkeep
from p2p.scoring import PeerEvent
from p2p.settings import BlobSink, BlobSource, OriginFetch, P2PSettings
from p2p.streams import PEER_FAULTS, close_quietly, open_stream, read_exactly, read_hashes

log = logging.getLogger(__name__)

BUSY_BACKOFF_S = 0.5
FAILURE_BACKOFF_S = 0.5
MAX_FAILURES_PER_SOURCE = 3  # broken or stalled transfers before a source is given up for a blob
HAVE_QUERY_INTERVAL_S = 5.0  # gossip carries holdings; the query covers what gossip missed


class BlobFetchError(RuntimeError):
    """No peer, origin or fallback could deliver a blob that matches its hash."""


class _CorruptResponse(Exception):
    """A peer answered with a size or bytes that contradict the signed manifest."""


@dataclass
class _Partial:
    """A blob being assembled, possibly from several peers in turn (resumed at an offset)."""

    data: bytearray = field(default_factory=bytearray)
    segments: list[tuple[str, int, int]] = field(default_factory=list)  # (peer, start, end)


@dataclass
class _BlobTask:
    blob_hash: bytes
    size: int
    partial: _Partial = field(default_factory=_Partial)
    failed: set[str] = field(default_factory=set)  # sources not to ask again for this blob
    num_failures: Counter[str] = field(default_factory=Counter)
    told_elsewhere_at: float | None = None  # when an origin first answered ELSEWHERE
    # Segments of an assembly that failed its hash: (peer, start, bytes), judged against the
    # verified blob once it arrives, so exactly the peers that lied are blamed.
    suspects: list[tuple[str, int, bytes]] = field(default_factory=list)


class Fetcher:
    """Fetches a version's blobs, max_concurrent_downloads at a time. Holders come from gossip and
    from have queries to every connected peer; each blob goes to the least-loaded, best-scored ready
    holder, resuming a broken transfer at its offset with the next one. The origins are asked once
    no holder is usable, or holders stayed busy for peer_patience_s (after an origin's ELSEWHERE,
    peers get that long again); origin_fetch once no origin can serve. A holder that lies about a
    blob or its bytes is scored down (a corrupt one banned); a verified blob is stored through
    blob_sink and declared held."""

    def __init__(
        self,
        settings: P2PSettings,
        peers: PeerUpkeep,
        holdings: Holdings,
        *,
        blob_source: BlobSource,
        blob_sink: BlobSink,
        declare_held: Callable[[Sequence[bytes]], None],
    ) -> None:
        self._settings = settings
        self._peers = peers
        self._holdings = holdings
        self._blob_source = blob_source
        self._blob_sink = blob_sink
        self._declare_held = declare_held
        self._inflight: Counter[str] = Counter()
        self._busy_until: dict[str, float] = {}

    async def fetch_blobs(
        self, hashes: Sequence[bytes], sizes: Sequence[int], origin_fetch: OriginFetch | None
    ) -> dict[bytes, bytes]:
        """Fetch every blob (checked against its hash) from peers, then the origins, then origin_fetch."""
        if len(hashes) != len(sizes):
            raise ValueError(f"got {len(hashes)} hashes but {len(sizes)} sizes")
        tasks = [_BlobTask(h, s) for h, s in dict(zip(hashes, sizes, strict=True)).items()]
        random.shuffle(tasks)  # different nodes start on different blobs, so early copies differ
        results: dict[bytes, bytes] = {}
        errors: dict[bytes, str] = {}
        limiter = trio.CapacityLimiter(self._settings.max_concurrent_downloads)

        async def fetch_task(task: _BlobTask) -> None:
            async with limiter:
                try:
                    results[task.blob_hash] = await self._fetch_one(task, origin_fetch)
                except BlobFetchError as error:
                    errors[task.blob_hash] = str(error)

        async with trio.open_nursery() as outer:
            outer.start_soon(self._query_holders_while, results, [t.blob_hash for t in tasks])
            async with trio.open_nursery() as nursery:
                for task in tasks:
                    nursery.start_soon(fetch_task, task)
            outer.cancel_scope.cancel()
        if errors:
            raise BlobFetchError("; ".join(errors.values()))
        return results

    async def _query_holders_while(self, results: dict[bytes, bytes], hashes: list[bytes]) -> None:
        """Ask connected peers which of the missing blobs they hold, now and every few seconds."""
        while True:
            missing = [h for h in hashes if h not in results][: wire.MAX_HASHES_PER_MESSAGE]
            async with trio.open_nursery() as nursery:
                for peer_id in self._peers.connected_peers():
                    if peer_id not in self._peers.origin_ids and not self._peers.scores.is_banned(peer_id):
                        nursery.start_soon(self._query_have, peer_id, missing)
            await trio.sleep(HAVE_QUERY_INTERVAL_S)

    async def _query_have(self, peer_id: str, hashes: list[bytes]) -> None:
        try:
            with trio.fail_after(self._settings.stall_timeout_s):
                async with open_stream(self._peers.host, ID.from_base58(peer_id), wire.HAVE_PROTOCOL) as stream:
                    await stream.write(wire.encode_hashes(hashes))
                    held = await read_hashes(stream)
        except wire.WireFormatError:
            self._peers.record(peer_id, PeerEvent.JUNK_MESSAGE)
            return
        except PEER_FAULTS as error:
            log.debug("have query to %s failed: %s", peer_id, error)
            return
        asked = set(hashes)
        self._holdings.add_holder(peer_id, [h for h in held if h in asked])

    def _usable_holders(self, task: _BlobTask) -> list[str]:
        peers = self._peers
        return [
            p
            for p in self._holdings.holders_of(task.blob_hash)
            if p not in task.failed
            and p not in peers.origin_ids
            and not peers.scores.is_banned(p)
            and peers.is_connected(p)
        ]

    def _pick_peer(self, task: _BlobTask) -> str | None:
        now = trio.current_time()
        ready = [p for p in self._usable_holders(task) if self._busy_until.get(p, 0.0) <= now]
        if not ready:
            return None
        return min(ready, key=lambda p: (self._inflight[p], -self._peers.scores.score(p), random.random()))

    async def _fetch_one(self, task: _BlobTask, origin_fetch: OriginFetch | None) -> bytes:
        started = trio.current_time()
        while True:
            if task.blob_hash in self._holdings.held:
                data = await trio.to_thread.run_sync(self._blob_source, task.blob_hash)
                if data is not None and wire.sha256(data) == task.blob_hash:
                    return data
            peer = self._pick_peer(task)
            if peer is not None:
                data = await self._attempt(peer, task, last_resort=False)
                if data is not None:
                    return data
                continue
            data = await self._fetch_from_origins(task, origin_fetch, started)
            if data is not None:
                return data
            with trio.move_on_after(random.uniform(BUSY_BACKOFF_S / 2, BUSY_BACKOFF_S)):
                await self._holdings.changed()

    async def _fetch_from_origins(
        self, task: _BlobTask, origin_fetch: OriginFetch | None, started: float
    ) -> bytes | None:
        """With no ready holder: an origin's copy once the peers had their chance, the fallback's
        once no origin can serve; None to wait for holders."""
        now = trio.current_time()
        holders_busy = bool(self._usable_holders(task))
        if holders_busy:
            go_to_origin = now - started >= self._settings.peer_patience_s
        elif task.told_elsewhere_at is None:
            go_to_origin = True
        else:
            go_to_origin = now - task.told_elsewhere_at >= self._settings.peer_patience_s
        if not go_to_origin:
            return None
        last_resort = holders_busy or task.told_elsewhere_at is not None
        origin_ids = self._peers.origin_ids
        for origin in [o for o in origin_ids if o not in task.failed and self._peers.is_connected(o)]:
            if self._busy_until.get(origin, 0.0) <= trio.current_time():
                data = await self._attempt(origin, task, last_resort=last_resort)
                if data is not None:
                    return data
        every_origin_failed = origin_ids <= task.failed
        no_origin_reachable = not any(o not in task.failed and self._peers.is_connected(o) for o in origin_ids)
        if not holders_busy and (every_origin_failed or (no_origin_reachable and origin_fetch is not None)):
            return await self._fetch_from_fallback(task, origin_fetch)
        return None

    async def _fetch_from_fallback(self, task: _BlobTask, origin_fetch: OriginFetch | None) -> bytes:
        if origin_fetch is None:
            raise BlobFetchError(f"blob {task.blob_hash.hex()}: no peer or origin could serve it")
        try:
            data = await trio.to_thread.run_sync(origin_fetch, task.blob_hash)
        except Exception as error:
            raise BlobFetchError(f"blob {task.blob_hash.hex()}: the origin fallback failed: {error}") from error
        if len(data) != task.size or wire.sha256(data) != task.blob_hash:
            raise BlobFetchError(f"blob {task.blob_hash.hex()}: the origin fallback returned bytes that do not match")
        await self._store(task, data)
        return data

    async def _attempt(self, peer: str, task: _BlobTask, *, last_resort: bool) -> bytes | None:
        """One request to one peer; the verified blob, or None (and the peer's record updated)."""
        self._inflight[peer] += 1
        try:
            status = await self._download(peer, task, last_resort)
        except _CorruptResponse as error:
            log.warning("peer %s sent a bad response for blob %s: %s", peer, task.blob_hash.hex(), error)
            self._peers.record(peer, PeerEvent.BLOB_CORRUPT)
            task.failed.add(peer)
            task.partial = _Partial()
            return None
        finally:
            self._inflight[peer] -= 1
        if status is None:
            self._peers.record(peer, PeerEvent.TRANSFER_FAILED)
            task.num_failures[peer] += 1
            # A peer is given up after a few broken transfers; an origin (the operator's own
            # seed) only backs off, and the fetch's deadline bounds the retries.
            if task.num_failures[peer] >= MAX_FAILURES_PER_SOURCE and peer not in self._peers.origin_ids:
                task.failed.add(peer)
            self._busy_until[peer] = trio.current_time() + FAILURE_BACKOFF_S
            return None
        if status == wire.BlobStatus.BUSY:
            self._busy_until[peer] = trio.current_time() + BUSY_BACKOFF_S
            return None
        if status == wire.BlobStatus.ELSEWHERE and peer in self._peers.origin_ids:
            if task.told_elsewhere_at is None:
                task.told_elsewhere_at = trio.current_time()
            return None
        if status != wire.BlobStatus.OK:
            if status == wire.BlobStatus.NOT_FOUND and peer not in self._peers.origin_ids:
                self._peers.record(peer, PeerEvent.FALSE_HAVE)
            self._holdings.drop_holder(task.blob_hash, peer)
            task.failed.add(peer)
            return None
        data = bytes(task.partial.data)
        if wire.sha256(data) != task.blob_hash:
            self._reject_assembly(task)
            return None
        for source in {p for p, _, _ in task.partial.segments}:
            self._peers.record(source, PeerEvent.BLOB_SERVED)
        await self._store(task, data)
        return data

    def _reject_assembly(self, task: _BlobTask) -> None:
        """The assembled bytes do not match the hash: blame the one source, or suspect them all."""
        sources = {p for p, _, _ in task.partial.segments}
        if len(sources) == 1:
            (source,) = sources
            log.warning("peer %s served blob %s with the wrong hash", source, task.blob_hash.hex())
            self._peers.record(source, PeerEvent.BLOB_CORRUPT)
        else:
            segments = task.partial.segments
            task.suspects.extend((p, start, bytes(task.partial.data[start:end])) for p, start, end in segments)
        task.failed.update(sources - self._peers.origin_ids)  # the origins are the operator's own seeds
        task.partial = _Partial()

    async def _store(self, task: _BlobTask, data: bytes) -> None:
        for peer, start, segment in task.suspects:
            if data[start : start + len(segment)] != segment:
                log.warning("peer %s served a corrupted part of blob %s", peer, task.blob_hash.hex())
                self._peers.record(peer, PeerEvent.BLOB_CORRUPT)
        await trio.to_thread.run_sync(self._blob_sink, task.blob_hash, data)
        self._declare_held([task.blob_hash])

    async def _download(self, peer: str, task: _BlobTask, last_resort: bool) -> wire.BlobStatus | None:
        """Request the rest of the blob (from the partial's end); None when the transfer broke."""
        partial = task.partial
        start = len(partial.data)
        try:
            with trio.fail_after(self._settings.connect_timeout_s):
                stream = await self._peers.host.new_stream(ID.from_base58(peer), [TProtocol(wire.BLOB_PROTOCOL)])
        except PEER_FAULTS as error:
            log.debug("opening a stream to %s failed: %s", peer, error)
            return None
        try:
            with trio.fail_after(self._settings.stall_timeout_s):
                await stream.write(wire.encode_blob_request(wire.BlobRequest(task.blob_hash, start, last_resort)))
            with trio.fail_after(self._settings.stall_timeout_s):
                status, total_size = wire.decode_blob_response_header(
                    await read_exactly(stream, wire.BLOB_RESPONSE_HEADER_BYTES)
                )
            if status != wire.BlobStatus.OK:
                return status
            if total_size != task.size:
                raise _CorruptResponse(f"declares {total_size} bytes, the manifest says {task.size}")
            while len(partial.data) < task.size:
                with trio.fail_after(self._settings.stall_timeout_s):
                    chunk = await stream.read(task.size - len(partial.data))
                if not chunk:
                    raise EOFError("stream ended early")
                if len(chunk) > task.size - len(partial.data):
                    raise _CorruptResponse("sent more bytes than the blob has")
                partial.data += chunk
            return wire.BlobStatus.OK
        except wire.WireFormatError as error:
            raise _CorruptResponse(str(error)) from error
        except PEER_FAULTS as error:
            log.debug("downloading blob %s from %s failed: %s", task.blob_hash.hex(), peer, error)
            return None
        finally:
            if len(partial.data) > start:
                partial.segments.append((peer, start, len(partial.data)))
            await close_quietly(stream)
