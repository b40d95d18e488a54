"""Which blobs this host holds, and which peers it knows to hold which blobs."""

from __future__ import annotations

from collections.abc import Iterable

import trio


class Holdings:
    """`held`: the blobs this host stores and serves. `holders`: blob hash -> peers known to hold it
    (from their have gossip and from have queries); a wait on `changed()` ends when that grows."""

    def __init__(self) -> None:
        self.held: set[bytes] = set()
        self.holders: dict[bytes, set[str]] = {}
        self._changed = trio.Event()

    def add_held(self, hashes: Iterable[bytes]) -> list[bytes]:
        """Record blobs this host now holds; the ones it did not hold before."""
        new = [h for h in dict.fromkeys(hashes) if h not in self.held]
        self.held.update(new)
        return new

    def add_holder(self, peer_id: str, hashes: Iterable[bytes]) -> None:
        new = [h for h in hashes if peer_id not in self.holders.get(h, ())]
        for blob_hash in new:
            self.holders.setdefault(blob_hash, set()).add(peer_id)
        if new:
            self._changed.set()
            self._changed = trio.Event()

    def holders_of(self, blob_hash: bytes) -> set[str]:
        return self.holders.get(blob_hash, set())

    def drop_holder(self, blob_hash: bytes, peer_id: str) -> None:
        self.holders.get(blob_hash, set()).discard(peer_id)

    def forget_peer(self, peer_id: str) -> None:
        for peers in self.holders.values():
            peers.discard(peer_id)

    async def changed(self) -> None:
        await self._changed.wait()

    def by_peer(self) -> dict[str, frozenset[bytes]]:
        by_peer: dict[str, set[bytes]] = {}
        for blob_hash, peers in self.holders.items():
            for peer in peers:
                by_peer.setdefault(peer, set()).add(blob_hash)
        return {peer: frozenset(hashes) for peer, hashes in by_peer.items()}
