"""Gossip: the run's signed manifests and every peer's holdings over gossipsub, each message checked
before it is forwarded."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

import trio
from google.protobuf.message import DecodeError
from libp2p.abc import IHost, ISubscriptionAPI
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub

from p2p import wire
from p2p.holdings import Holdings
from p2p.peers import PeerUpkeep
from p2p.scoring import PeerEvent
from p2p.settings import AnnouncementHandler, P2PSettings, VerifyManifest

if TYPE_CHECKING:
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)

MAX_VERIFIED_CACHE = 256


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


class Gossip:
    """Two gossipsub topics of the run. Manifests: each is checked against the trainer's signature
    before it is forwarded (junk costs the forwarder JUNK_MESSAGE) and handed to on_announcement once.
    Haves: the hashes a peer newly holds, batched every have_batch_interval_s, feeding `holdings`."""

    def __init__(
        self,
        run_id: str,
        settings: P2PSettings,
        peers: PeerUpkeep,
        holdings: Holdings,
        *,
        verify_manifest: VerifyManifest,
        on_announcement: AnnouncementHandler | None,
    ) -> None:
        self._settings = settings
        self._peers = peers
        self._holdings = holdings
        self._verify_manifest = verify_manifest
        self._on_announcement = on_announcement
        self._manifest_topic = wire.manifest_topic(run_id)
        self._have_topic = wire.have_topic(run_id)
        self._seen_manifests: set[bytes] = set()
        self._verified: OrderedDict[bytes, object] = OrderedDict()  # by validators, for the reader
        self._pending_haves: list[bytes] = []
        self._pubsub: Pubsub | None = None

    @property
    def pubsub(self) -> Pubsub:
        assert self._pubsub is not None, "the host is not running"
        return self._pubsub

    def open(self, host: IHost) -> GossipSub:
        """Create the pubsub of the host; the router, which runs beside it, is returned."""
        router = GossipSub(
            [PROTOCOL_ID_V11, PROTOCOL_ID],
            degree=6,
            degree_low=4,
            degree_high=12,
            heartbeat_interval=1,
            max_messages_per_topic_per_second=1000.0,
        )
        self._pubsub = _Pubsub(host, router)
        return router

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Subscribe to both topics, then read them and publish holdings until cancelled."""
        await self.pubsub.wait_until_ready()
        self.pubsub.set_topic_validator(self._manifest_topic, self._validate_manifest, False)
        self.pubsub.set_topic_validator(self._have_topic, self._validate_have, False)
        manifests = await self.pubsub.subscribe(self._manifest_topic)
        haves = await self.pubsub.subscribe(self._have_topic)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read_manifests, manifests)
            nursery.start_soon(self._read_haves, haves)
            nursery.start_soon(self._publish_haves)
            task_status.started()

    async def announce(self, signed_manifest: bytes) -> None:
        self._seen_manifests.add(wire.sha256(signed_manifest))
        await self.pubsub.publish(self._manifest_topic, signed_manifest)

    def declare_held(self, hashes: Sequence[bytes]) -> None:
        """Blobs this host now holds (and serves): recorded, and gossiped with the next batch."""
        self._pending_haves.extend(self._holdings.add_held(hashes))

    def ban(self, peer: ID) -> None:
        """Stop hearing from, and forwarding to, a banned peer."""
        self.pubsub.add_to_blacklist(peer)

    def announcement_subscribers(self) -> list[str]:
        return [p.to_base58() for p in self.pubsub.peer_topics.get(self._manifest_topic, ())]

    def _validate_manifest(self, forwarder: ID, message: rpc_pb2.Message) -> bool:
        try:
            verified = self._verify_manifest(message.data)
        except (ValueError, DecodeError) as error:
            log.info("dropping an announcement from %s that does not verify: %s", forwarder, error)
            self._peers.record(forwarder.to_base58(), PeerEvent.JUNK_MESSAGE)
            return False
        self._verified[wire.sha256(message.data)] = verified
        while len(self._verified) > MAX_VERIFIED_CACHE:
            self._verified.popitem(last=False)
        return True

    def _validate_have(self, forwarder: ID, message: rpc_pb2.Message) -> bool:
        try:
            wire.decode_hashes(message.data)
        except wire.WireFormatError:
            self._peers.record(forwarder.to_base58(), PeerEvent.JUNK_MESSAGE)
            return False
        return True

    async def _read_manifests(self, subscription: ISubscriptionAPI) -> None:
        async for message in subscription:
            key = wire.sha256(message.data)
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

    async def _read_haves(self, subscription: ISubscriptionAPI) -> None:
        async for message in subscription:
            holder = ID(message.from_id).to_base58()
            if holder != self._peers.peer_id and not self._peers.scores.is_banned(holder):
                self._holdings.add_holder(holder, wire.decode_hashes(message.data))

    async def _publish_haves(self) -> None:
        while True:
            await trio.sleep(self._settings.have_batch_interval_s)
            while self._pending_haves:
                batch = self._pending_haves[: wire.MAX_HASHES_PER_MESSAGE]
                del self._pending_haves[: len(batch)]
                await self.pubsub.publish(self._have_topic, wire.encode_hashes(batch))
