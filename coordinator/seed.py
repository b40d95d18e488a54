"""The seed peer beside the coordinator: the peer network's bootstrap and its origin.

Nodes dial the seed first, learn the other peers from it (/rollproof/peers/1.0.0), and fetch
from it the blobs no peer holds yet. The seed serves each blob of a version to at most
`origin_copies_per_blob` peers (super-seeding); everybody else is told ELSEWHERE and fetches
from those peers, so the seed's egress per version stays near one copy whatever the number of
nodes. A node that no peer can serve asks again as a last resort, and the seed always answers.

The peer host lives in p2p (shared code: the seed speaks the same protocols as a node).
"""

from __future__ import annotations

from collections.abc import Sequence

from coordinator.blobstore import BlobStore, UnknownBlobError
from p2p import P2PHost, P2PSettings
from p2p.settings import BlobSource, VerifyManifest
from protocol.identity import Identity
from protocol.manifest import signed_manifest_from_bytes, verify_manifest
from protocol.proto import policy_pb2
from protocol.types import PolicyManifest


def blob_source_of(store: BlobStore) -> BlobSource:
    """Serve the coordinator's policy store to peers: a blob's bytes, or None when not stored."""

    def read(blob_hash: bytes) -> bytes | None:
        try:
            return store.read_blob(blob_hash)
        except UnknownBlobError:
            return None

    return read


def trainer_manifest_verifier(trainer_public_key: bytes) -> VerifyManifest:
    """Check a serialized SignedManifest against the run's pinned trainer key (ValueError if not)."""

    def verify(data: bytes) -> PolicyManifest:
        return verify_manifest(signed_manifest_from_bytes(data), trainer_public_key)

    return verify


def _refuse_blob(blob_hash: bytes, data: bytes) -> None:
    raise RuntimeError(f"the seed never stores fetched blobs (asked to store {blob_hash.hex()})")


class SeedHost:
    def __init__(
        self,
        identity: Identity,
        run_id: str,
        *,
        blob_source: BlobSource,
        verify_manifest: VerifyManifest,
        settings: P2PSettings = P2PSettings(),
    ) -> None:
        self._verify_manifest = verify_manifest
        self._host = P2PHost(
            identity,
            run_id,
            settings,
            blob_source=blob_source,
            blob_sink=_refuse_blob,
            verify_manifest=verify_manifest,
            is_seed=True,
        )
        self._blobs_by_version: dict[int, tuple[policy_pb2.BlobRef, ...]] = {}

    @property
    def peer_id(self) -> str:
        return self._host.peer_id

    @property
    def bootstrap_addrs(self) -> list[str]:
        """What nodes put in their p2p bootstrap list: multiaddrs ending in /p2p/<seed id>."""
        return self._host.addrs

    def start(self) -> None:
        self._host.start()

    def stop(self) -> None:
        self._host.stop()

    def publish_version(self, signed_manifest: bytes) -> int:
        """Announce a version whose blobs blob_source already serves; return its version number.
        Raises ValueError when the manifest does not verify."""
        self._verify_manifest(signed_manifest)
        manifest = policy_pb2.PolicyManifest.FromString(policy_pb2.SignedManifest.FromString(signed_manifest).manifest)
        self._blobs_by_version[manifest.version] = tuple(manifest.blobs)
        self._host.add_holdings([blob.hash for blob in manifest.blobs])
        self._host.announce(signed_manifest)
        return manifest.version

    def version_size(self, version: int) -> int:
        return sum(blob.size for blob in self._blobs(version))

    def origin_bytes_sent(self, version: int) -> int:
        """Bytes of this version's blobs the seed has sent to peers so far (a blob shared by two
        versions counts for both)."""
        sent = self._host.egress().bytes_sent_by_blob
        return sum(sent.get(blob.hash, 0) for blob in self._blobs(version))

    def connected_peers(self) -> list[str]:
        return self._host.connected_peers()

    def announcement_subscribers(self) -> list[str]:
        return self._host.announcement_subscribers()

    def banned_peers(self) -> set[str]:
        return self._host.scores().banned

    def _blobs(self, version: int) -> Sequence[policy_pb2.BlobRef]:
        if version not in self._blobs_by_version:
            raise ValueError(f"version {version} was not published through this seed")
        return self._blobs_by_version[version]
