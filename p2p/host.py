"""A peer host in its own thread: trio and libp2p stay there, the rest of the process (asyncio,
gRPC, plain threads) calls the methods here, which block until the trio side answers.

From asyncio, call the blocking methods through `asyncio.to_thread`. Never call them from the
on_announcement callback: that runs in the host thread itself.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress
from typing import TypeVar

import trio

from p2p.scoring import PeerScores
from p2p.service import PeerService
from p2p.settings import AnnouncementHandler, BlobSink, BlobSource, OriginFetch, P2PSettings, VerifyManifest
from p2p.uploader import EgressCounters
from protocol.identity import Identity

T = TypeVar("T")
DEFAULT_SETTINGS = P2PSettings()
log = logging.getLogger(__name__)


class P2PHostError(RuntimeError):
    """The peer host could not start, or is not running."""


class P2PHost:
    """A PeerService running in its own thread; each method blocks until the trio side answers."""

    def __init__(
        self,
        identity: Identity,
        run_id: str,
        settings: P2PSettings = DEFAULT_SETTINGS,
        *,
        blob_source: BlobSource,
        blob_sink: BlobSink,
        verify_manifest: VerifyManifest,
        bootstrap: Sequence[str] = (),
        on_announcement: AnnouncementHandler | None = None,
        is_seed: bool = False,
    ) -> None:
        """bootstrap: multiaddrs with /p2p/<id> of the seed peers (the origins); is_seed: serve the
        peer list that other peers discover each other through."""
        self._service = PeerService(
            identity,
            run_id,
            settings,
            blob_source=blob_source,
            blob_sink=blob_sink,
            verify_manifest=verify_manifest,
            bootstrap=bootstrap,
            on_announcement=on_announcement,
            is_seed=is_seed,
        )
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._cancel_scope: trio.CancelScope | None = None
        self._addrs: list[str] = []
        self._error: BaseException | None = None

    @property
    def peer_id(self) -> str:
        return self._service.peer_id

    @property
    def addrs(self) -> list[str]:
        """Dialable multiaddrs of this host, each ending in /p2p/<peer id>."""
        return list(self._addrs)

    def start(self, timeout_s: float = 30.0) -> None:
        if self._thread is not None:
            raise P2PHostError("the peer host was already started")
        self._thread = threading.Thread(target=self._thread_main, name=f"p2p-{self.peer_id[-6:]}", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise P2PHostError(f"the peer host did not start listening within {timeout_s} s")
        if self._error is not None:
            raise P2PHostError(f"the peer host failed to start: {self._error}") from self._error

    def stop(self, timeout_s: float = 10.0) -> None:
        """Close every connection and end the host thread; safe to call twice."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            return
        if self._token is not None and self._cancel_scope is not None:
            with suppress(trio.RunFinishedError):  # the host ended on its own
                trio.from_thread.run_sync(self._cancel_scope.cancel, trio_token=self._token)
        thread.join(timeout_s)
        if thread.is_alive():
            raise P2PHostError(f"the peer host thread did not stop within {timeout_s} s")

    def _thread_main(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as error:  # raised by start(), or by the next call once running
            self._error = error
            if self._ready.is_set():
                log.error("the peer host %s stopped on an error", self.peer_id, exc_info=error)
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as scope:
            self._cancel_scope = scope
            async with trio.open_nursery() as nursery:
                self._addrs = await nursery.start(self._service.run)
                self._ready.set()

    def _check_running(self) -> None:
        if self._token is None or self._thread is None:
            raise P2PHostError("the peer host is not running; call start() first")
        if not self._thread.is_alive():
            if self._error is not None:
                raise P2PHostError(f"the peer host stopped on an error: {self._error!r}") from self._error
            raise P2PHostError("the peer host was stopped")

    def _run(self, function: Callable[..., Awaitable[T]], *args: object) -> T:
        self._check_running()
        return trio.from_thread.run(function, *args, trio_token=self._token)

    def _run_sync(self, function: Callable[..., T], *args: object) -> T:
        self._check_running()
        return trio.from_thread.run_sync(function, *args, trio_token=self._token)

    def fetch_blobs(
        self,
        hashes: Sequence[bytes],
        sizes: Sequence[int],
        origin_fetch: OriginFetch | None = None,
        timeout_s: float = 600.0,
    ) -> dict[bytes, bytes]:
        """Fetch blobs by SHA-256 from peers that hold them, falling back to the seed origins and
        then to origin_fetch; every blob is checked against its hash and size, stored through
        blob_sink and gossiped as held. Raises BlobFetchError when a blob cannot be had."""

        async def fetch() -> dict[bytes, bytes]:
            with trio.fail_after(timeout_s):
                return await self._service.fetch_blobs(list(hashes), list(sizes), origin_fetch)

        return self._run(fetch)

    def announce(self, signed_manifest: bytes) -> None:
        """Gossip a signed manifest to the run's peers."""
        self._run(self._service.announce, signed_manifest)

    def add_holdings(self, hashes: Sequence[bytes]) -> None:
        """Declare blobs this host already holds (blob_source serves them) and gossip that."""
        self._run_sync(self._service.add_holdings, list(hashes))

    def holdings(self) -> dict[str, frozenset[bytes]]:
        """Which peers this host knows to hold which blobs."""
        return self._run_sync(self._service.holdings)

    def held(self) -> frozenset[bytes]:
        return self._run_sync(lambda: frozenset(self._service.held))

    def egress(self) -> EgressCounters:
        return self._run_sync(self._service.egress)

    def connected_peers(self) -> list[str]:
        return self._run_sync(self._service.connected_peers)

    def announcement_subscribers(self) -> list[str]:
        """Peers known to be subscribed to this run's announcements (they will hear announce())."""
        return self._run_sync(self._service.announcement_subscribers)

    def scores(self) -> PeerScores:
        """A copy of this host's peer scores and ban list."""
        return self._run_sync(
            lambda: PeerScores(
                self._service.scores.ban_threshold, dict(self._service.scores.scores), set(self._service.scores.banned)
            )
        )
