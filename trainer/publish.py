"""Publishing policy versions: encode, sign, hand to a sink.

The published policy is the bf16 rounding of the trainer's weights (policy/weights.py).
Version n goes out as a delta against version n-1; every `keyframe_interval` versions, and
for the first version, also as a keyframe, so that nodes in step download the small delta
and late joiners start from a recent keyframe. A delta names the hash of its base state
(`base_state_hash`, see protocol/manifest.py): the previous manifest's state_hash, which the
publisher keeps, so each state is hashed once. A sink takes the signed manifest and its
blobs: the coordinator's policy store (coordinator/blobstore.py BlobStore has this shape and
serves as the local sink in one-process runs and tests), or a client that uploads the blobs
and then the manifest over gRPC.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from policy.weights import export_bf16_state
from protocol.codec import BF16State, check_bf16_state
from protocol.envelope import now_ms
from protocol.identity import Identity
from protocol.manifest import PolicyUpdate, build_delta, build_keyframe, sign_manifest
from protocol.types import PolicyManifest, SignedManifest

DEFAULT_KEYFRAME_INTERVAL = 20


class PublishError(ValueError):
    pass


class PolicySink(Protocol):
    def put_version(self, signed: SignedManifest, blobs: Mapping[bytes, bytes]) -> Any: ...


@dataclass(frozen=True)
class PublishedUpdate:
    signed: SignedManifest
    manifest: PolicyManifest
    num_blob_bytes: int


@dataclass(frozen=True)
class PublishedVersion:
    version: int
    delta: PublishedUpdate | None
    keyframe: PublishedUpdate | None


class PolicyPublisher:
    """Publishes consecutive versions of one run, remembering the last published state."""

    def __init__(
        self,
        identity: Identity,
        run_id: str,
        sink: PolicySink,
        *,
        keyframe_interval: int = DEFAULT_KEYFRAME_INTERVAL,
        clock_ms: Callable[[], int] = now_ms,
    ):
        if keyframe_interval < 1:
            raise ValueError("keyframe_interval must be at least 1")
        self.identity = identity
        self.run_id = run_id
        self.sink = sink
        self.keyframe_interval = keyframe_interval
        self.clock_ms = clock_ms
        self._version: int | None = None
        self._state: BF16State | None = None
        self._state_hash: bytes | None = None  # of _state, once a manifest declared it

    @property
    def version(self) -> int | None:
        """The last version published (or resumed from)."""
        return self._version

    def resume(self, version: int, state: BF16State) -> None:
        """Continue after a restart: `state` is what version `version` published."""
        check_bf16_state(state)
        self._version, self._state, self._state_hash = version, state, None

    def publish_model(self, version: int, model: Any) -> PublishedVersion:
        """Publish the bf16 rounding of `model`'s parameters as `version`."""
        return self.publish(version, export_bf16_state(model))

    def publish(self, version: int, state: BF16State) -> PublishedVersion:
        """Publish `state` as `version`. The publisher keeps `state` as the base of the next
        delta: do not modify its arrays afterwards."""
        check_bf16_state(state)
        if self._version is not None and version <= self._version:
            raise PublishError(f"version {version} is not newer than the last published, {self._version}")
        created_at_ms = self.clock_ms()
        delta = None
        if self._state is not None:
            assert self._version is not None
            delta = self._send(
                build_delta(
                    self.run_id,
                    version,
                    self._version,
                    self._state,
                    state,
                    base_state_hash=self._state_hash,
                    created_at_ms=created_at_ms,
                )
            )
        keyframe = None
        if delta is None or version % self.keyframe_interval == 0:
            keyframe = self._send(build_keyframe(self.run_id, version, state, created_at_ms=created_at_ms))
        published = delta or keyframe
        assert published is not None
        self._version, self._state, self._state_hash = version, state, published.manifest.state_hash
        return PublishedVersion(version=version, delta=delta, keyframe=keyframe)

    def _send(self, update: PolicyUpdate) -> PublishedUpdate:
        signed = sign_manifest(self.identity, update.manifest)
        self.sink.put_version(
            signed, {ref.hash: blob for ref, blob in zip(update.manifest.blobs, update.blobs, strict=True)}
        )
        return PublishedUpdate(
            signed=signed, manifest=update.manifest, num_blob_bytes=sum(ref.size for ref in update.manifest.blobs)
        )
