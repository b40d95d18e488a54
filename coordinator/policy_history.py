"""The policy states a validator replays against: rebuilt from the same signed updates the nodes
apply, checked against the trainer's key, the last few versions kept in memory."""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol

from coordinator.blobstore import NoUpdatePathError
from protocol.codec import BF16State
from protocol.manifest import apply_update, open_update, verify_manifest
from protocol.types import SignedManifest


class PolicySource(Protocol):
    """Where signed updates come from: the coordinator's blob store, or the coordinator over gRPC."""

    def update_path(self, from_version: int | None) -> list[SignedManifest]:
        """Raises NoUpdatePathError when there is nothing to apply."""
        ...

    def read_blob(self, blob_hash: bytes) -> bytes: ...


class PolicyHistory:
    """bf16 states of the last `num_versions` policy versions, rebuilt by applying the same signed
    updates a node applies (checked against the trainer's key)."""

    def __init__(self, blobs: PolicySource, run_id: str, trainer_public_key: bytes, num_versions: int):
        self.blobs = blobs
        self.run_id = run_id
        self.trainer_public_key = trainer_public_key
        self.num_versions = num_versions
        self._tip: BF16State | None = None
        self._tip_version: int | None = None
        self._states: OrderedDict[int, BF16State] = OrderedDict()

    def advance(self) -> None:
        try:
            path = self.blobs.update_path(self._tip_version)
        except NoUpdatePathError:
            return
        for signed in path:
            manifest = verify_manifest(signed, self.trainer_public_key)
            opened = open_update(
                signed,
                {ref.hash: self.blobs.read_blob(ref.hash) for ref in manifest.blobs},
                trainer_public_key=self.trainer_public_key,
                run_id=self.run_id,
                current_version=self._tip_version,
                current_specs=None,
            )
            base = None if opened.keyframe_state is not None else self._tip
            new_state = apply_update(base, opened)
            self._tip = new_state
            self._tip_version = opened.manifest.version
            self._states[opened.manifest.version] = {name: bits.copy() for name, bits in new_state.items()}
            while len(self._states) > self.num_versions:
                self._states.popitem(last=False)

    def state(self, version: int) -> BF16State | None:
        if version not in self._states:
            self.advance()
        return self._states.get(version)
