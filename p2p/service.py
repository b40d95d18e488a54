"""The trio side of a peer host: one PeerService composes the parts below. Everything here runs in
the host's own trio thread; host.py is the thread-safe face.

Trust: every blob is checked against its SHA-256 before it is stored or served on, every
announcement against the trainer's signature before it is acted on. A peer that serves bytes
that do not match, or gossips junk, is scored down and, below the threshold, banned.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service

from p2p.fetcher import Fetcher
from p2p.gossip import Gossip
from p2p.holdings import Holdings
from p2p.peers import PeerUpkeep
from p2p.scoring import PeerEvent
from p2p.settings import AnnouncementHandler, BlobSink, BlobSource, OriginFetch, P2PSettings, VerifyManifest
from p2p.uploader import EgressCounters, Uploader
from protocol.identity import Identity

if TYPE_CHECKING:
    from trio_typing import TaskStatus

__all__ = ["EgressCounters", "PeerService"]


class PeerService:
    """One peer of a run's network, the object its owner holds. It composes:

    - `_peers` (PeerUpkeep, p2p/peers.py): the libp2p host, connections, scores and bans, the seed's
      peer list, and the guard around every stream handler;
    - `_gossip` (Gossip, p2p/gossip.py): signed manifests and have announcements over gossipsub;
    - `_uploader` (Uploader, p2p/uploader.py): serving blobs and have queries (slots, byte rate,
      super-seeding, egress);
    - `_fetcher` (Fetcher, p2p/fetcher.py): fetching blobs from holders, then origins, then the fallback;
    - `_holdings` (Holdings, p2p/holdings.py): what this host holds and who holds what, which they share.
    """

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
        self._holdings = Holdings()
        self._peers = PeerUpkeep(identity, settings, bootstrap=bootstrap, is_seed=is_seed, on_ban=self._forget)
        self._gossip = Gossip(
            run_id,
            settings,
            self._peers,
            self._holdings,
            verify_manifest=verify_manifest,
            on_announcement=on_announcement,
        )
        self._uploader = Uploader(settings, self._peers.guard, self._holdings, blob_source=blob_source, is_seed=is_seed)
        self._fetcher = Fetcher(
            settings,
            self._peers,
            self._holdings,
            blob_source=blob_source,
            blob_sink=blob_sink,
            declare_held=self._gossip.declare_held,
        )
        self._settings = settings
        self.peer_id = self._peers.peer_id
        self.scores = self._peers.scores

    @property
    def held(self) -> set[bytes]:
        """The blobs this host holds and serves."""
        return self._holdings.held

    @property
    def host(self) -> IHost:
        return self._peers.host

    @property
    def pubsub(self) -> Pubsub:
        return self._gossip.pubsub

    async def run(self, *, task_status: TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled; report the dialable addresses (with /p2p/<id>) once listening."""
        host = self._peers.open_host()
        router = self._gossip.open(host)
        self._uploader.open(host)
        async with self._peers.listening(), background_trio_service(self.pubsub), background_trio_service(router):
            await self._peers.stop_auto_connector()
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(self._gossip.run)
                    await nursery.start(self._peers.run)
                    task_status.started([str(a) for a in host.get_addrs()])
            finally:
                # Cancellation alone leaves the sockets open, and peers would keep a dead
                # connection for minutes: close them so peers see this host leave.
                with trio.CancelScope(shield=True), trio.move_on_after(self._settings.connect_timeout_s):
                    await host.close()

    def _forget(self, banned: ID) -> None:
        self._gossip.ban(banned)
        self._holdings.forget_peer(banned.to_base58())

    # ---- the peers ----

    def own_addrs(self) -> list[str]:
        """Addresses (without /p2p) that other peers should dial."""
        return self._peers.own_addrs()

    def is_connected(self, peer_id: str) -> bool:
        return self._peers.is_connected(peer_id)

    def connected_peers(self) -> list[str]:
        return self._peers.connected_peers()

    def record(self, peer_id: str, event: PeerEvent) -> None:
        """Score what a peer did; below the ban threshold it is banned and disconnected."""
        self._peers.record(peer_id, event)

    def drop_if_banned(self, peer: ID) -> None:
        self._peers.drop_if_banned(peer)

    # ---- gossip ----

    async def announce(self, signed_manifest: bytes) -> None:
        await self._gossip.announce(signed_manifest)

    def add_holdings(self, hashes: Sequence[bytes]) -> None:
        """Declare blobs this host holds (and serves from blob_source), and gossip them."""
        self._gossip.declare_held(hashes)

    def announcement_subscribers(self) -> list[str]:
        """Peers known to be subscribed to this run's announcements."""
        return self._gossip.announcement_subscribers()

    # ---- blobs ----

    async def fetch_blobs(
        self, hashes: Sequence[bytes], sizes: Sequence[int], origin_fetch: OriginFetch | None
    ) -> dict[bytes, bytes]:
        """Fetch every blob (checked against its hash) from peers, then the origins, then origin_fetch."""
        return await self._fetcher.fetch_blobs(hashes, sizes, origin_fetch)

    def egress(self) -> EgressCounters:
        return self._uploader.egress()

    def holdings(self) -> dict[str, frozenset[bytes]]:
        """Which peers this host knows to hold which blobs."""
        return self._holdings.by_peer()
