"""The trio side of a peer host: the libp2p host, gossip, the blob/have/peer-list protocols and
the fetcher. Everything here runs in the host's own trio thread; host.py is the thread-safe face.

Trust: every blob is checked against its SHA-256 before it is stored or served on, every
announcement against the trainer's signature before it is acted on. A peer that serves bytes
that do not match, or gossips junk, is scored down and, below the threshold, banned.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import multiaddr
import trio
from cryptography.hazmat.primitives import serialization
from google.protobuf.message import DecodeError
from libp2p import new_host
from libp2p.abc import IHost, INetConn, INetStream, INetwork, INotifee
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service

from p2p import wire
from p2p.scoring import PeerEvent, PeerScores, peers_to_drop
from p2p.settings import AnnouncementHandler, BlobSink, BlobSource, OriginFetch, P2PSettings, VerifyManifest
from p2p.throttle import UploadThrottle
from protocol.identity import Identity

log = logging.getLogger(__name__)

PEER_LIST_SIZE = 32
PEER_LIST_REFRESH_S = 10.0
BUSY_BACKOFF_S = 0.5
UPLOAD_QUEUE_WAIT_S = 1.0
MAX_QUEUED_PER_UPLOAD_SLOT = 2
FAILURE_BACKOFF_S = 0.5
MAX_FAILURES_PER_SOURCE = 3  # broken or stalled transfers before a source is given up for a blob
HAVE_QUERY_INTERVAL_S = 5.0  # gossip carries holdings; the query covers what gossip missed
MAX_VERIFIED_CACHE = 256
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


class BlobFetchError(RuntimeError):
    """No peer, origin or fallback could deliver a blob that matches its hash."""


class _CorruptResponse(Exception):
    """A peer answered with a size or bytes that contradict the signed manifest."""


def key_pair_from_identity(identity: Identity) -> KeyPair:
    """The libp2p key pair of a node's Ed25519 identity, so its peer id is its key id."""
    seed = identity.private_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return create_new_key_pair(seed)


async def acquire_within(lock: trio.Lock | trio.Semaphore, timeout_s: float, refuse: bool = False) -> bool:
    """Wait up to timeout_s for the lock or semaphore (queueing is cheaper than the asker
    polling); False at once when `refuse`, or when the wait runs out."""
    if refuse:
        return False
    with trio.move_on_after(timeout_s):
        await lock.acquire()
        return True
    return False


def sha256(data: bytes | bytearray) -> bytes:
    return hashlib.sha256(data).digest()


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


@dataclass
class EgressCounters:
    bytes_sent_total: int
    bytes_sent_by_blob: dict[bytes, int]


class _BanGate(INotifee):
    """Drops every connection a banned peer opens (libp2p's own gates filter by IP only)."""

    def __init__(self, service: PeerService) -> None:
        self._service = service

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        self._service.drop_if_banned(conn.muxed_conn.peer_id)

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        return None

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def listen(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        return None

    async def listen_close(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        return None


class _Pubsub(Pubsub):
    """libp2p 0.8.1's blacklist teardown deletes the peer after awaiting the reset of its stream; by
    then the dead-peer handler may have removed it, and the KeyError ends the whole host (seen when
    a ban and its disconnect race). It also left the banned peer in the router's mesh. Here the
    dead-peer handler does the removal, which checks before it deletes and is never interrupted."""

    async def _teardown_if_connected(self, peer_id: ID) -> None:
        stream = self.peers.get(peer_id)
        if stream is not None:
            try:
                await stream.reset()
            except Exception as error:  # the stream is dropped whatever its reset raised
                log.debug("resetting the pubsub stream of %s: %s", peer_id, error)
        self._handle_dead_peer(peer_id)


class PeerService:
    def __init__(
        self,
        identity: Identity,
        run_id: str,
        settings: P2PSettings,
        *,
        blob_source: BlobSource,
        blob_sink: BlobSink,
        verify_manifest: VerifyManifest,
        bootstrap: Sequence[str] = (),
        on_announcement: AnnouncementHandler | None = None,
        is_seed: bool = False,
    ) -> None:
        self.identity = identity
        self.run_id = run_id
        self.settings = settings
        self._blob_source = blob_source
        self._blob_sink = blob_sink
        self._verify_manifest = verify_manifest
        self._bootstrap = [info_from_p2p_addr(multiaddr.Multiaddr(addr)) for addr in bootstrap]
        self.origin_ids = {info.peer_id.to_base58() for info in self._bootstrap}
        self._on_announcement = on_announcement
        self.is_seed = is_seed
        self.peer_id = identity.key_id
        self.scores = PeerScores()
        self.holders: dict[bytes, set[str]] = {}
        self.held: set[bytes] = set()
        self.bytes_sent_by_blob: Counter[bytes] = Counter()
        self._origin_copies: Counter[bytes] = Counter()
        self._seeding_turns: defaultdict[str, trio.Lock] = defaultdict(trio.Lock)
        self._pending_haves: list[bytes] = []
        self._holdings_changed = trio.Event()
        self._inflight: Counter[str] = Counter()
        self._busy_until: dict[str, float] = {}
        self._upload_slots = trio.Semaphore(settings.max_concurrent_uploads)
        self._seen_manifests: set[bytes] = set()
        self._verified: OrderedDict[bytes, object] = OrderedDict()
        self._registry: dict[str, wire.PeerRecord] = {}
        self._manifest_topic = wire.manifest_topic(run_id)
        self._have_topic = wire.have_topic(run_id)
        self._host: IHost | None = None
        self._pubsub: Pubsub | None = None
        self._nursery: trio.Nursery | None = None
        self._throttle: UploadThrottle | None = None

    # ---- lifecycle ----

    @property
    def host(self) -> IHost:
        assert self._host is not None, "the host is not running"
        return self._host

    @property
    def pubsub(self) -> Pubsub:
        assert self._pubsub is not None, "the host is not running"
        return self._pubsub

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled; report the dialable addresses (with /p2p/<id>) once listening."""
        listen = multiaddr.Multiaddr(self.settings.listen)
        announce = [multiaddr.Multiaddr(self.settings.public_address)] if self.settings.public_address else None
        self._host = new_host(key_pair=key_pair_from_identity(self.identity), listen_addrs=[listen], announce_addrs=announce)
        gossipsub = GossipSub(
            [PROTOCOL_ID_V11, PROTOCOL_ID],
            degree=6,
            degree_low=4,
            degree_high=12,
            heartbeat_interval=1,
            max_messages_per_topic_per_second=1000.0,
        )
        self._pubsub = _Pubsub(self.host, gossipsub)
        self._throttle = UploadThrottle(self.settings.upload_bytes_per_s, burst_bytes=self.settings.chunk_bytes)
        self.host.get_network().register_notifee(_BanGate(self))
        self.host.set_stream_handler(TProtocol(wire.BLOB_PROTOCOL), self._serve_blob)
        self.host.set_stream_handler(TProtocol(wire.HAVE_PROTOCOL), self._serve_have)
        if self.is_seed:
            self.host.set_stream_handler(TProtocol(wire.PEERS_PROTOCOL), self._serve_peers)
        async with self.host.run([listen]), background_trio_service(self.pubsub), background_trio_service(gossipsub):
            # libp2p's auto-connector redials every peer it has heard of (banned and departed
            # ones included) up to hundreds of connections; _maintain_peers keeps the peer set.
            await self.host.get_network().auto_connector.stop()
            await self.pubsub.wait_until_ready()
            self.pubsub.set_topic_validator(self._manifest_topic, self._validate_manifest, False)
            self.pubsub.set_topic_validator(self._have_topic, self._validate_have, False)
            manifests = await self.pubsub.subscribe(self._manifest_topic)
            haves = await self.pubsub.subscribe(self._have_topic)
            try:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(self._read_manifests, manifests)
                    nursery.start_soon(self._read_haves, haves)
                    nursery.start_soon(self._publish_haves)
                    if self._bootstrap:
                        nursery.start_soon(self._maintain_peers)
                    task_status.started([str(a) for a in self.host.get_addrs()])
            finally:
                # Cancellation alone leaves the sockets open, and peers would keep a dead
                # connection for minutes: close them so peers see this host leave.
                with trio.CancelScope(shield=True), trio.move_on_after(self.settings.connect_timeout_s):
                    await self.host.close()

    def own_addrs(self) -> list[str]:
        """Addresses (without /p2p) that other peers should dial."""
        if self.settings.public_address:
            return [self.settings.public_address]
        return [str(a) for a in self.host.get_transport_addrs()]

    # ---- peers ----

    def is_connected(self, peer_id: str) -> bool:
        return bool(self.host.get_network().connections.get(ID.from_base58(peer_id)))

    def connected_peers(self) -> list[str]:
        return [p.to_base58() for p in self.host.get_connected_peers() if self.host.get_network().connections.get(p)]

    def record(self, peer_id: str, event: PeerEvent) -> None:
        if peer_id == self.peer_id or peer_id in self.origin_ids:  # the seeds are the operator's
            return
        if self.scores.record(peer_id, event):
            log.warning("banning peer %s (score %.1f after %s)", peer_id, self.scores.score(peer_id), event.value)
            self._ban(peer_id)

    def _ban(self, peer_id: str) -> None:
        peer = ID.from_base58(peer_id)
        self.pubsub.add_to_blacklist(peer)
        for peers in self.holders.values():
            peers.discard(peer_id)
        if self._nursery is not None:
            self._nursery.start_soon(self._disconnect, peer)

    def drop_if_banned(self, peer: ID) -> None:
        if self.scores.is_banned(peer.to_base58()) and self._nursery is not None:
            self._nursery.start_soon(self._disconnect, peer)

    async def _disconnect(self, peer: ID) -> None:
        try:
            await self.host.disconnect(peer)
        except PEER_FAULTS as error:
            log.debug("disconnecting %s: %s", peer, error)

    async def _connect(self, info: PeerInfo) -> bool:
        with trio.move_on_after(self.settings.connect_timeout_s):
            try:
                await self.host.connect(info)
                return True
            except PEER_FAULTS as error:
                log.debug("connecting to %s failed: %s", info.peer_id, error)
        return False

    async def _maintain_peers(self) -> None:
        """Stay connected to the seeds, register with them, and keep max_peers other peers;
        ask a seed for more peers at once while below max_peers, then every PEER_LIST_REFRESH_S."""
        asked_at: dict[str, float] = {}
        while True:
            for info in self._bootstrap:
                seed_id = info.peer_id.to_base58()
                if not self.is_connected(seed_id) and not await self._connect(info):
                    asked_at.pop(seed_id, None)
                    continue
                others = [p for p in self.connected_peers() if p not in self.origin_ids]
                due = trio.current_time() - asked_at.get(seed_id, -PEER_LIST_REFRESH_S) >= PEER_LIST_REFRESH_S
                if len(others) >= self.settings.max_peers or not due:
                    continue
                records = await self._ask_for_peers(info.peer_id)
                if records is None:
                    continue
                asked_at[seed_id] = trio.current_time()
                await self._connect_to(records, self.settings.max_peers - len(others))
                if len(records) > len(others):  # the seed knows peers not tried yet: ask again soon
                    asked_at[seed_id] -= PEER_LIST_REFRESH_S
            for peer_id in peers_to_drop(self.connected_peers(), self.scores, self.settings.max_peers, self.origin_ids):
                await self._disconnect(ID.from_base58(peer_id))
            await trio.sleep(self.settings.discovery_interval_s)

    async def _connect_to(self, records: list[wire.PeerRecord], num_wanted: int) -> None:
        connected = set(self.connected_peers())
        fresh = [
            r
            for r in records
            if r.peer_id not in connected and r.peer_id != self.peer_id and not self.scores.is_banned(r.peer_id)
        ]
        random.shuffle(fresh)

        async def connect_one(record: wire.PeerRecord) -> None:
            try:
                info = PeerInfo(ID.from_base58(record.peer_id), [multiaddr.Multiaddr(a) for a in record.addrs])
            except (ValueError, BaseLibp2pError) as error:
                log.debug("skipping a malformed peer record %s: %s", record, error)
                return
            await self._connect(info)

        async with trio.open_nursery() as nursery:
            for record in fresh[: max(0, num_wanted)]:
                nursery.start_soon(connect_one, record)

    async def _ask_for_peers(self, seed: ID) -> list[wire.PeerRecord] | None:
        try:
            with trio.fail_after(self.settings.connect_timeout_s):
                stream = await self.host.new_stream(seed, [TProtocol(wire.PEERS_PROTOCOL)])
                try:
                    await stream.write(wire.encode_peer_list([wire.PeerRecord(self.peer_id, tuple(self.own_addrs()))]))
                    length = wire.decode_peer_list_length(await read_exactly(stream, 4))
                    return wire.decode_peer_list_body(await read_exactly(stream, length))
                finally:
                    await stream.close()
        except PEER_FAULTS as error:
            log.debug("asking seed %s for peers failed: %s", seed, error)
            return None

    async def _serve_peers(self, stream: INetStream) -> None:
        peer_id = stream.muxed_conn.peer_id.to_base58()
        try:
            with trio.fail_after(self.settings.stall_timeout_s):
                length = wire.decode_peer_list_length(await read_exactly(stream, 4))
                claimed = wire.decode_peer_list_body(await read_exactly(stream, length))
            if claimed:
                self._registry[peer_id] = wire.PeerRecord(peer_id, claimed[0].addrs)
            for listed in [p for p in self._registry if not self.is_connected(p) or self.scores.is_banned(p)]:
                del self._registry[listed]
            others = [r for p, r in self._registry.items() if p != peer_id]
            await stream.write(wire.encode_peer_list(random.sample(others, min(PEER_LIST_SIZE, len(others)))))
        except wire.WireFormatError:
            self.record(peer_id, PeerEvent.JUNK_MESSAGE)
        except PEER_FAULTS as error:
            log.debug("serving a peer list to %s failed: %s", peer_id, error)
        finally:
            await self._close(stream)

    @staticmethod
    async def _close(stream: INetStream) -> None:
        try:
            await stream.close()
        except PEER_FAULTS:
            pass

    # ---- announcements and holdings over gossip ----

    def _validate_manifest(self, forwarder: ID, message: rpc_pb2.Message) -> bool:
        try:
            verified = self._verify_manifest(message.data)
        except (ValueError, DecodeError) as error:
            log.info("dropping an announcement from %s that does not verify: %s", forwarder, error)
            self.record(forwarder.to_base58(), PeerEvent.JUNK_MESSAGE)
            return False
        self._verified[sha256(message.data)] = verified
        while len(self._verified) > MAX_VERIFIED_CACHE:
            self._verified.popitem(last=False)
        return True

    def _validate_have(self, forwarder: ID, message: rpc_pb2.Message) -> bool:
        try:
            wire.decode_hashes(message.data)
        except wire.WireFormatError:
            self.record(forwarder.to_base58(), PeerEvent.JUNK_MESSAGE)
            return False
        return True

    async def _read_manifests(self, subscription: Any) -> None:
        async for message in subscription:
            key = sha256(message.data)
            if key in self._seen_manifests:
                continue
            self._seen_manifests.add(key)
            verified = self._verified.pop(key, None)
            if verified is None:
                try:
                    verified = self._verify_manifest(message.data)
                except (ValueError, DecodeError):
                    continue
            if self._on_announcement is not None:
                publisher = ID(message.from_id).to_base58()
                try:
                    self._on_announcement(message.data, verified, publisher)
                except Exception:
                    log.exception("the announcement handler failed")

    async def _read_haves(self, subscription: Any) -> None:
        async for message in subscription:
            holder = ID(message.from_id).to_base58()
            if holder == self.peer_id or self.scores.is_banned(holder):
                continue
            for blob_hash in wire.decode_hashes(message.data):
                self.holders.setdefault(blob_hash, set()).add(holder)
            self._notify_holdings()

    def _notify_holdings(self) -> None:
        self._holdings_changed.set()
        self._holdings_changed = trio.Event()

    async def _publish_haves(self) -> None:
        while True:
            await trio.sleep(self.settings.have_batch_interval_s)
            while self._pending_haves:
                batch = self._pending_haves[: wire.MAX_HASHES_PER_MESSAGE]
                del self._pending_haves[: len(batch)]
                await self.pubsub.publish(self._have_topic, wire.encode_hashes(batch))

    async def announce(self, signed_manifest: bytes) -> None:
        self._seen_manifests.add(sha256(signed_manifest))
        await self.pubsub.publish(self._manifest_topic, signed_manifest)

    def add_holdings(self, hashes: Sequence[bytes]) -> None:
        """Declare blobs this host holds (and serves from blob_source), and gossip them."""
        new = [h for h in hashes if h not in self.held]
        self.held.update(new)
        self._pending_haves.extend(new)

    # ---- serving ----

    async def _serve_blob(self, stream: INetStream) -> None:
        peer_id = stream.muxed_conn.peer_id.to_base58()
        try:
            if self.scores.is_banned(peer_id):
                await stream.reset()
                return
            with trio.fail_after(self.settings.stall_timeout_s):
                request = wire.decode_blob_request(await read_exactly(stream, wire.BLOB_REQUEST_BYTES))
            if self._seeded_elsewhere(request):
                await stream.write(wire.encode_blob_response_header(wire.BlobStatus.ELSEWHERE, 0))
                return
            seeding = self.is_seed and request.offset == 0
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
        except wire.WireFormatError:
            self.record(peer_id, PeerEvent.JUNK_MESSAGE)
        except PEER_FAULTS as error:
            log.debug("serving a blob to %s failed: %s", peer_id, error)
        finally:
            await self._close(stream)

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
            self.is_seed
            and request.offset == 0
            and not request.last_resort
            and self._origin_copies[request.blob_hash] >= self.settings.origin_copies_per_blob
        )

    def _queue_is_full(self) -> bool:
        return self._upload_slots.statistics().tasks_waiting >= MAX_QUEUED_PER_UPLOAD_SLOT * self.settings.max_concurrent_uploads

    async def _upload(self, stream: INetStream, blob_hash: bytes, offset: int) -> bool:
        """Send the blob from offset on; True when all of it went out."""
        assert self._throttle is not None
        data = await trio.to_thread.run_sync(self._blob_source, blob_hash)
        if data is None:
            await stream.write(wire.encode_blob_response_header(wire.BlobStatus.NOT_FOUND, 0))
            return False
        if offset > len(data):
            await stream.write(wire.encode_blob_response_header(wire.BlobStatus.BAD_REQUEST, len(data)))
            return False
        await stream.write(wire.encode_blob_response_header(wire.BlobStatus.OK, len(data)))
        view = memoryview(data)
        for start in range(offset, len(data), self.settings.chunk_bytes):
            chunk = view[start : start + self.settings.chunk_bytes]
            await self._throttle.pace(len(chunk))
            with trio.fail_after(self.settings.stall_timeout_s):
                await stream.write(bytes(chunk))
            self.bytes_sent_by_blob[blob_hash] += len(chunk)
        return True

    async def _serve_have(self, stream: INetStream) -> None:
        peer_id = stream.muxed_conn.peer_id.to_base58()
        try:
            if self.scores.is_banned(peer_id):
                await stream.reset()
                return
            with trio.fail_after(self.settings.stall_timeout_s):
                prefix = await read_exactly(stream, 4)
                num_hashes = wire.decode_num_hashes(prefix)
                asked = wire.decode_hashes(prefix + await read_exactly(stream, num_hashes * wire.HASH_BYTES))
            await stream.write(wire.encode_hashes([h for h in asked if h in self.held]))
        except wire.WireFormatError:
            self.record(peer_id, PeerEvent.JUNK_MESSAGE)
        except PEER_FAULTS as error:
            log.debug("answering a have query from %s failed: %s", peer_id, error)
        finally:
            await self._close(stream)

    # ---- fetching ----

    async def fetch_blobs(
        self, hashes: Sequence[bytes], sizes: Sequence[int], origin_fetch: OriginFetch | None
    ) -> dict[bytes, bytes]:
        """Fetch every blob (checked against its hash) from peers, then the origins, then origin_fetch."""
        if len(hashes) != len(sizes):
            raise ValueError(f"got {len(hashes)} hashes but {len(sizes)} sizes")
        tasks = [_BlobTask(h, s) for h, s in dict(zip(hashes, sizes)).items()]
        random.shuffle(tasks)  # different nodes start on different blobs, so early copies differ
        results: dict[bytes, bytes] = {}
        errors: dict[bytes, str] = {}
        limiter = trio.CapacityLimiter(self.settings.max_concurrent_downloads)

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
                for peer_id in self.connected_peers():
                    if peer_id not in self.origin_ids and not self.scores.is_banned(peer_id):
                        nursery.start_soon(self._query_have, peer_id, missing)
            await trio.sleep(HAVE_QUERY_INTERVAL_S)

    async def _query_have(self, peer_id: str, hashes: list[bytes]) -> None:
        try:
            with trio.fail_after(self.settings.stall_timeout_s):
                stream = await self.host.new_stream(ID.from_base58(peer_id), [TProtocol(wire.HAVE_PROTOCOL)])
                try:
                    await stream.write(wire.encode_hashes(hashes))
                    prefix = await read_exactly(stream, 4)
                    num_hashes = wire.decode_num_hashes(prefix)
                    held = wire.decode_hashes(prefix + await read_exactly(stream, num_hashes * wire.HASH_BYTES))
                finally:
                    await self._close(stream)
        except wire.WireFormatError:
            self.record(peer_id, PeerEvent.JUNK_MESSAGE)
            return
        except PEER_FAULTS as error:
            log.debug("have query to %s failed: %s", peer_id, error)
            return
        asked = set(hashes)
        new = [h for h in held if h in asked and peer_id not in self.holders.get(h, ())]
        for blob_hash in new:
            self.holders.setdefault(blob_hash, set()).add(peer_id)
        if new:
            self._notify_holdings()

    def _usable_holders(self, task: _BlobTask) -> list[str]:
        return [
            p
            for p in self.holders.get(task.blob_hash, ())
            if p not in task.failed and p not in self.origin_ids and not self.scores.is_banned(p) and self.is_connected(p)
        ]

    def _pick_peer(self, task: _BlobTask) -> str | None:
        now = trio.current_time()
        ready = [p for p in self._usable_holders(task) if self._busy_until.get(p, 0.0) <= now]
        if not ready:
            return None
        return min(ready, key=lambda p: (self._inflight[p], -self.scores.score(p), random.random()))

    async def _fetch_one(self, task: _BlobTask, origin_fetch: OriginFetch | None) -> bytes:
        started = trio.current_time()
        while True:
            if task.blob_hash in self.held:
                data = await trio.to_thread.run_sync(self._blob_source, task.blob_hash)
                if data is not None and sha256(data) == task.blob_hash:
                    return data
            peer = self._pick_peer(task)
            if peer is not None:
                data = await self._attempt(peer, task, last_resort=False)
                if data is not None:
                    return data
                continue
            now = trio.current_time()
            holders_busy = bool(self._usable_holders(task))
            if holders_busy:
                go_to_origin = now - started >= self.settings.peer_patience_s
            elif task.told_elsewhere_at is None:
                go_to_origin = True
            else:
                go_to_origin = now - task.told_elsewhere_at >= self.settings.peer_patience_s
            if go_to_origin:
                last_resort = holders_busy or task.told_elsewhere_at is not None
                origins = [o for o in self.origin_ids if o not in task.failed and self.is_connected(o)]
                for origin in origins:
                    if self._busy_until.get(origin, 0.0) <= trio.current_time():
                        data = await self._attempt(origin, task, last_resort=last_resort)
                        if data is not None:
                            return data
                every_origin_failed = self.origin_ids <= task.failed
                no_origin_reachable = not any(o not in task.failed and self.is_connected(o) for o in self.origin_ids)
                if not holders_busy and (every_origin_failed or (no_origin_reachable and origin_fetch is not None)):
                    return await self._fetch_from_fallback(task, origin_fetch)
            with trio.move_on_after(random.uniform(BUSY_BACKOFF_S / 2, BUSY_BACKOFF_S)):
                await self._holdings_changed.wait()

    async def _fetch_from_fallback(self, task: _BlobTask, origin_fetch: OriginFetch | None) -> bytes:
        if origin_fetch is None:
            raise BlobFetchError(f"blob {task.blob_hash.hex()}: no peer or origin could serve it")
        try:
            data = await trio.to_thread.run_sync(origin_fetch, task.blob_hash)
        except Exception as error:
            raise BlobFetchError(f"blob {task.blob_hash.hex()}: the origin fallback failed: {error}") from error
        if len(data) != task.size or sha256(data) != task.blob_hash:
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
            self.record(peer, PeerEvent.BLOB_CORRUPT)
            task.failed.add(peer)
            task.partial = _Partial()
            return None
        finally:
            self._inflight[peer] -= 1
        if status is None:
            self.record(peer, PeerEvent.TRANSFER_FAILED)
            task.num_failures[peer] += 1
            # A peer is given up after a few broken transfers; an origin (the operator's own
            # seed) only backs off, and the fetch's deadline bounds the retries.
            if task.num_failures[peer] >= MAX_FAILURES_PER_SOURCE and peer not in self.origin_ids:
                task.failed.add(peer)
            self._busy_until[peer] = trio.current_time() + FAILURE_BACKOFF_S
            return None
        if status == wire.BlobStatus.BUSY:
            self._busy_until[peer] = trio.current_time() + BUSY_BACKOFF_S
            return None
        if status == wire.BlobStatus.ELSEWHERE and peer in self.origin_ids:
            if task.told_elsewhere_at is None:
                task.told_elsewhere_at = trio.current_time()
            return None
        if status != wire.BlobStatus.OK:
            if status == wire.BlobStatus.NOT_FOUND and peer not in self.origin_ids:
                self.record(peer, PeerEvent.FALSE_HAVE)
            self.holders.get(task.blob_hash, set()).discard(peer)
            task.failed.add(peer)
            return None
        data = bytes(task.partial.data)
        if sha256(data) != task.blob_hash:
            self._reject_assembly(task)
            return None
        for source in {p for p, _, _ in task.partial.segments}:
            self.record(source, PeerEvent.BLOB_SERVED)
        await self._store(task, data)
        return data

    def _reject_assembly(self, task: _BlobTask) -> None:
        """The assembled bytes do not match the hash: blame the one source, or suspect them all."""
        sources = {p for p, _, _ in task.partial.segments}
        if len(sources) == 1:
            (source,) = sources
            log.warning("peer %s served blob %s with the wrong hash", source, task.blob_hash.hex())
            self.record(source, PeerEvent.BLOB_CORRUPT)
        else:
            task.suspects.extend((p, start, bytes(task.partial.data[start:end])) for p, start, end in task.partial.segments)
        task.failed.update(sources - self.origin_ids)  # the origins are the operator's own seeds
        task.partial = _Partial()

    async def _store(self, task: _BlobTask, data: bytes) -> None:
        for peer, start, segment in task.suspects:
            if data[start : start + len(segment)] != segment:
                log.warning("peer %s served a corrupted part of blob %s", peer, task.blob_hash.hex())
                self.record(peer, PeerEvent.BLOB_CORRUPT)
        await trio.to_thread.run_sync(self._blob_sink, task.blob_hash, data)
        self.add_holdings([task.blob_hash])

    async def _download(self, peer: str, task: _BlobTask, last_resort: bool) -> wire.BlobStatus | None:
        """Request the rest of the blob (from the partial's end); None when the transfer broke."""
        partial = task.partial
        start = len(partial.data)
        try:
            with trio.fail_after(self.settings.connect_timeout_s):
                stream = await self.host.new_stream(ID.from_base58(peer), [TProtocol(wire.BLOB_PROTOCOL)])
        except PEER_FAULTS as error:
            log.debug("opening a stream to %s failed: %s", peer, error)
            return None
        try:
            with trio.fail_after(self.settings.stall_timeout_s):
                await stream.write(wire.encode_blob_request(wire.BlobRequest(task.blob_hash, start, last_resort)))
            with trio.fail_after(self.settings.stall_timeout_s):
                status, total_size = wire.decode_blob_response_header(
                    await read_exactly(stream, wire.BLOB_RESPONSE_HEADER_BYTES)
                )
            if status != wire.BlobStatus.OK:
                return status
            if total_size != task.size:
                raise _CorruptResponse(f"declares {total_size} bytes, the manifest says {task.size}")
            while len(partial.data) < task.size:
                with trio.fail_after(self.settings.stall_timeout_s):
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
            await self._close(stream)

    # ---- reporting ----

    def egress(self) -> EgressCounters:
        return EgressCounters(sum(self.bytes_sent_by_blob.values()), dict(self.bytes_sent_by_blob))

    def announcement_subscribers(self) -> list[str]:
        """Peers known to be subscribed to this run's announcements."""
        return [p.to_base58() for p in self.pubsub.peer_topics.get(self._manifest_topic, ())]

    def holdings(self) -> dict[str, frozenset[bytes]]:
        by_peer: dict[str, set[bytes]] = {}
        for blob_hash, peers in self.holders.items():
            for peer in peers:
                by_peer.setdefault(peer, set()).add(blob_hash)
        return {peer: frozenset(hashes) for peer, hashes in by_peer.items()}
