"""Peer upkeep: the libp2p host, the peers it keeps connected, their scores and bans, and (on a seed)
the peer list through which other peers find each other."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING

import multiaddr
import trio
from cryptography.hazmat.primitives import serialization
from libp2p import new_host
from libp2p.abc import IHost, INetConn, INetStream, INetwork, INotifee
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.network.swarm import Swarm
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr

from p2p import wire
from p2p.scoring import PeerEvent, PeerScores, peers_to_drop
from p2p.settings import P2PSettings
from p2p.streams import PEER_FAULTS, StreamGuard, open_stream, read_peer_list
from protocol.identity import Identity

if TYPE_CHECKING:
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)

PEER_LIST_SIZE = 32
PEER_LIST_REFRESH_S = 10.0


def key_pair_from_identity(identity: Identity) -> KeyPair:
    """The libp2p key pair of a node's Ed25519 identity, so its peer id is its key id."""
    seed = identity.private_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return create_new_key_pair(seed)


class _BanGate(INotifee):
    """Drops every connection a banned peer opens (libp2p's own gates filter by IP only)."""

    def __init__(self, peers: PeerUpkeep) -> None:
        self._peers = peers

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        self._peers.drop_if_banned(conn.muxed_conn.peer_id)

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


class PeerUpkeep:
    """Owns the libp2p host and decides who it stays connected to: the seeds (the origins, never
    scored), and up to max_peers others, found through a seed's peer list and dropped lowest-score
    first. Scores what peers do (`record`) and bans a peer below the threshold: its connections are
    dropped, now and whenever it dials again, and `on_ban` tells the other parts to forget it.
    `guard` wraps every stream handler of this host."""

    def __init__(
        self,
        identity: Identity,
        settings: P2PSettings,
        *,
        bootstrap: Sequence[str],
        is_seed: bool,
        on_ban: Callable[[ID], None],
    ) -> None:
        self._identity = identity
        self._settings = settings
        self._bootstrap = [info_from_p2p_addr(multiaddr.Multiaddr(addr)) for addr in bootstrap]
        self._is_seed = is_seed
        self._on_ban = on_ban
        self.peer_id = identity.key_id
        self.origin_ids = {info.peer_id.to_base58() for info in self._bootstrap}
        self.scores = PeerScores()
        self.guard = StreamGuard(self.scores, self.record, settings.stall_timeout_s)
        self._listen_addrs = [multiaddr.Multiaddr(settings.listen)]
        self._registry: dict[str, wire.PeerRecord] = {}  # a seed's peer list
        self._host: IHost | None = None
        self._nursery: trio.Nursery | None = None

    @property
    def host(self) -> IHost:
        assert self._host is not None, "the host is not running"
        return self._host

    def open_host(self) -> IHost:
        """Create the host (not listening yet), with the ban gate and, on a seed, the peer list."""
        announce = [multiaddr.Multiaddr(self._settings.public_address)] if self._settings.public_address else None
        self._host = new_host(
            key_pair=key_pair_from_identity(self._identity), listen_addrs=self._listen_addrs, announce_addrs=announce
        )
        self._host.get_network().register_notifee(_BanGate(self))
        if self._is_seed:
            handler = self.guard.handler("serving a peer list", read_peer_list, self._serve_peers)
            self._host.set_stream_handler(TProtocol(wire.PEERS_PROTOCOL), handler)
        return self._host

    def listening(self) -> AbstractAsyncContextManager[None]:
        """The host, listening on its address until the block ends."""
        return self.host.run(self._listen_addrs)

    async def stop_auto_connector(self) -> None:
        """libp2p's auto-connector redials every peer it has heard of (banned and departed ones
        included) up to hundreds of connections; `run` keeps the peer set instead."""
        network = self.host.get_network()
        assert isinstance(network, Swarm), f"libp2p's network is a Swarm, got {type(network).__name__}"
        await network.auto_connector.stop()

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Carry out bans, and keep the peer set when there are seeds, until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self._bootstrap:
                nursery.start_soon(self._maintain_peers)
            task_status.started()
            await trio.sleep_forever()

    def own_addrs(self) -> list[str]:
        """Addresses (without /p2p) that other peers should dial."""
        if self._settings.public_address:
            return [self._settings.public_address]
        return [str(a) for a in self.host.get_transport_addrs()]

    def is_connected(self, peer_id: str) -> bool:
        return bool(self.host.get_network().connections.get(ID.from_base58(peer_id)))

    def connected_peers(self) -> list[str]:
        return [p.to_base58() for p in self.host.get_connected_peers() if self.host.get_network().connections.get(p)]

    def record(self, peer_id: str, event: PeerEvent) -> None:
        if peer_id == self.peer_id or peer_id in self.origin_ids:  # the seeds are the operator's
            return
        if self.scores.record(peer_id, event):
            log.warning("banning peer %s (score %.1f after %s)", peer_id, self.scores.score(peer_id), event.value)
            peer = ID.from_base58(peer_id)
            self._on_ban(peer)
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
        with trio.move_on_after(self._settings.connect_timeout_s):
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
                if len(others) >= self._settings.max_peers or not due:
                    continue
                records = await self._ask_for_peers(info.peer_id)
                if records is None:
                    continue
                asked_at[seed_id] = trio.current_time()
                await self._connect_to(records, self._settings.max_peers - len(others))
                if len(records) > len(others):  # the seed knows peers not tried yet: ask again soon
                    asked_at[seed_id] -= PEER_LIST_REFRESH_S
            for peer_id in peers_to_drop(
                self.connected_peers(), self.scores, self._settings.max_peers, self.origin_ids
            ):
                await self._disconnect(ID.from_base58(peer_id))
            await trio.sleep(self._settings.discovery_interval_s)

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
        """Register this host's addresses with a seed; the peers the seed lists back."""
        try:
            with trio.fail_after(self._settings.connect_timeout_s):
                async with open_stream(self.host, seed, wire.PEERS_PROTOCOL) as stream:
                    await stream.write(wire.encode_peer_list([wire.PeerRecord(self.peer_id, tuple(self.own_addrs()))]))
                    return await read_peer_list(stream)
        except PEER_FAULTS as error:
            log.debug("asking seed %s for peers failed: %s", seed, error)
            return None

    async def _serve_peers(self, stream: INetStream, peer_id: str, claimed: list[wire.PeerRecord]) -> None:
        """Register the asking peer under the addresses it claims; answer with other live peers."""
        if claimed:
            self._registry[peer_id] = wire.PeerRecord(peer_id, claimed[0].addrs)
        for listed in [p for p in self._registry if not self.is_connected(p) or self.scores.is_banned(p)]:
            del self._registry[listed]
        others = [r for p, r in self._registry.items() if p != peer_id]
        await stream.write(wire.encode_peer_list(random.sample(others, min(PEER_LIST_SIZE, len(others)))))
