"""Published policy versions: blobs and signed manifests on disk (BlobStore) plus one row
per version in the store, for counters and the dashboard."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

from coordinator.blobstore import BlobStore, NoUpdatePathError
from coordinator.store import PolicyVersionRecord, Store, VersionExistsError
from protocol.codec import num_elements
from protocol.manifest import verify_manifest
from protocol.types import Codec, PolicyManifest, SignedManifest

log = logging.getLogger(__name__)

BF16_BYTES = 2


class PolicyVersions:
    def __init__(self, blobs: BlobStore, store: Store, trainer_public_key: bytes):
        self.blobs = blobs
        self.store = store
        self.trainer_public_key = trainer_public_key
        self.on_publish: list[Callable[[SignedManifest], None]] = []
        self._record_missing()

    def _record(self, signed: SignedManifest, manifest: PolicyManifest, created_ms: int) -> None:
        if self.store.get_version(manifest.version) is not None:
            return
        with contextlib.suppress(VersionExistsError):  # recorded by another replica meanwhile
            self.store.add_version(
                PolicyVersionRecord(
                    version=manifest.version,
                    base_version=manifest.base_version,
                    codec=manifest.codec,
                    signed_manifest=signed.manifest_bytes,
                    num_bytes=sum(ref.size for ref in manifest.blobs),
                    full_state_bytes=BF16_BYTES * sum(num_elements(spec) for spec in manifest.tensors),
                    created_ms=created_ms,
                )
            )

    def _record_missing(self) -> None:
        """Versions whose files were written but whose row was not (a crash in between)."""
        for version in sorted({version for version, _ in self.blobs.versions()}):
            if self.store.get_version(version) is None:
                signed = self.manifest(version)
                manifest = verify_manifest(signed, self.trainer_public_key)
                self._record(signed, manifest, manifest.created_at_ms)
                log.info("recorded policy version %d found on disk", version)

    def refresh(self) -> bool:
        """Catch up with the versions another replica on this store published (each replica
        calls this every second): reload the blob store and tell the listeners of the newest.
        Returns whether there was a newer version."""
        latest = self.store.latest_version()
        held = self.blobs.latest_version()
        if latest is None or (held is not None and latest.version <= held):
            return False
        self.blobs.reload()
        signed = self.manifest(None)
        log.info("policy version %d was published through another replica", latest.version)
        for listener in self.on_publish:
            listener(signed)
        return True

    def publish(self, signed: SignedManifest) -> PolicyManifest:
        """Store a version whose blobs were uploaded; the row records the delta when both a
        delta and a keyframe of a version are published."""
        self.refresh()
        manifest = self.blobs.put_version(signed, {})
        self._record(signed, manifest, manifest.created_at_ms)
        for listener in self.on_publish:
            listener(signed)
        return manifest

    def manifest(self, version: int | None) -> SignedManifest:
        """The manifest of `version` (default: the latest), the delta when there is one."""
        stored = set(self.blobs.versions())
        if version is None:
            version = self.blobs.latest_version()
            if version is None:
                raise NoUpdatePathError("no policy version has been published yet")
        for codec in (Codec.DELTA, Codec.KEYFRAME):
            if (version, codec) in stored:
                return self.blobs.signed_manifest(version, codec)
        raise NoUpdatePathError(f"policy version {version} is not stored (dropped by retention?)")

    def update_path(self, from_version: int | None) -> list[SignedManifest]:
        return self.blobs.update_path(from_version)
