"""The coordinator's policy store: signed manifests and content-addressed blobs on disk.

Layout under the store's root (the coordinator uses `<data_dir>/policy`):

    blobs/<first 2 hex digits>/<64 hex digits>     one blob, named by its SHA-256
    manifests/<version, 12 digits>.<keyframe|delta>  a serialized SignedManifest

Every version is checked before it is stored: the trainer's signature (pinned key), the run,
the order (a version is newer than the latest, or the latest published again with the other
codec; a delta's base is the version before it; the first version is a keyframe), and every
blob's size and hash. Blobs are written before their manifest, each by write-then-rename.

Retention keeps the newest `num_keyframes_kept` keyframes and the deltas after the oldest of
them; everything older goes, with the blobs no kept manifest names. A node at any version
from the oldest kept keyframe on catches up by deltas; any other node (a late joiner) by the
newest keyframe plus the deltas after it — `update_path` picks the cheaper in bytes.
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

from protocol.manifest import (
    HASH_BYTES,
    MAX_BLOB_BYTES,
    PolicyUpdateError,
    check_blob,
    signed_manifest_from_bytes,
    signed_manifest_to_bytes,
    verify_manifest,
)
from protocol.manifest import (
    blob_hash as compute_blob_hash,
)
from protocol.types import Codec, PolicyManifest, SignedManifest

DEFAULT_NUM_KEYFRAMES_KEPT = 2
DEFAULT_CHUNK_BYTES = 256 * 1024
_BLOB_NAME = re.compile(r"^[0-9a-f]{64}$")
_MANIFEST_NAME = re.compile(r"^(\d{12})\.(keyframe|delta)$")
_CODEC_NAMES = {Codec.KEYFRAME: "keyframe", Codec.DELTA: "delta"}


class BlobStoreError(ValueError):
    """A version or blob the store refuses or does not have."""


class UnknownBlobError(BlobStoreError):
    pass


class BlobHashError(BlobStoreError):
    """A blob hash of the wrong length."""


class BlobRangeError(BlobStoreError):
    pass


class VersionOrderError(BlobStoreError):
    pass


class NoUpdatePathError(BlobStoreError):
    pass


def parse_blob_hex(text: str) -> bytes:
    """The hash named by a blob's 64 lowercase hex digits."""
    if not _BLOB_NAME.match(text):
        raise UnknownBlobError(f"{text[:80]!r} is not a blob name (64 lowercase hex digits)")
    return bytes.fromhex(text)


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".incoming-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _blob_bytes(manifests: list[PolicyManifest]) -> int:
    return sum(ref.size for manifest in manifests for ref in manifest.blobs)


class BlobStore:
    def __init__(
        self,
        root: Path,
        *,
        run_id: str,
        trainer_public_key: bytes,
        num_keyframes_kept: int = DEFAULT_NUM_KEYFRAMES_KEPT,
    ):
        if num_keyframes_kept < 1:
            raise ValueError("num_keyframes_kept must be at least 1")
        self.root = Path(root).expanduser()
        self.run_id = run_id
        self.trainer_public_key = trainer_public_key
        self.num_keyframes_kept = num_keyframes_kept
        self._blob_dir = self.root / "blobs"
        self._manifest_dir = self.root / "manifests"
        self._blob_dir.mkdir(parents=True, exist_ok=True)
        self._manifest_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._versions: dict[tuple[int, Codec], tuple[SignedManifest, PolicyManifest]] = {}
        self._load()
        self._collect_unreferenced_blobs(self._stored_blob_hashes())

    # ---- reading ----

    def latest_version(self) -> int | None:
        with self._lock:
            return max((version for version, _ in self._versions), default=None)

    def versions(self) -> list[tuple[int, Codec]]:
        with self._lock:
            return sorted(self._versions)

    def signed_manifest(self, version: int, codec: Codec) -> SignedManifest:
        with self._lock:
            if (version, codec) not in self._versions:
                raise BlobStoreError(f"no {_CODEC_NAMES[codec]} for version {version} is stored")
            return self._versions[(version, codec)][0]

    def blob_path(self, blob_hash: bytes) -> Path:
        if len(blob_hash) != HASH_BYTES:
            raise BlobHashError(f"a blob hash has {HASH_BYTES} bytes, not {len(blob_hash)}")
        hex_hash = blob_hash.hex()
        return self._blob_dir / hex_hash[:2] / hex_hash

    def has_blob(self, blob_hash: bytes) -> bool:
        return self.blob_path(blob_hash).is_file()

    def blob_size(self, blob_hash: bytes) -> int:
        try:
            return self.blob_path(blob_hash).stat().st_size
        except FileNotFoundError:
            raise UnknownBlobError(f"blob {blob_hash.hex()} is not stored") from None

    def read_blob(self, blob_hash: bytes) -> bytes:
        try:
            return self.blob_path(blob_hash).read_bytes()
        except FileNotFoundError:
            raise UnknownBlobError(f"blob {blob_hash.hex()} is not stored") from None

    def iter_blob_chunks(
        self, blob_hash: bytes, offset: int = 0, length: int | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES
    ) -> Iterator[bytes]:
        """The bytes of a blob from `offset` (`length` of them, default: to the end), in
        chunks: what gRPC streaming and HTTP Range responses serve."""
        size = self.blob_size(blob_hash)
        if offset < 0 or offset > size:
            raise BlobRangeError(f"offset {offset} is outside blob {blob_hash.hex()} of {size} bytes")
        end = size if length is None else offset + length
        if length is not None and (length < 0 or end > size):
            raise BlobRangeError(f"range {offset}+{length} is outside blob {blob_hash.hex()} of {size} bytes")
        return self._read_range(blob_hash, offset, end, chunk_bytes)

    def _read_range(self, blob_hash: bytes, offset: int, end: int, chunk_bytes: int) -> Iterator[bytes]:
        with open(self.blob_path(blob_hash), "rb") as handle:
            handle.seek(offset)
            while offset < end:
                chunk = handle.read(min(chunk_bytes, end - offset))
                if not chunk:
                    raise BlobRangeError(f"blob {blob_hash.hex()} ended early (removed by retention?)")
                offset += len(chunk)
                yield chunk

    def update_path(self, from_version: int | None) -> list[SignedManifest]:
        """The manifests a node holding `from_version` (None: nothing) applies, in order, to
        reach the latest version: deltas only, or the newest keyframe and the deltas after
        it, whichever has fewer blob bytes."""
        with self._lock:
            latest = self.latest_version()
            if latest is None:
                raise NoUpdatePathError("no policy version has been published yet")
            if from_version is not None and from_version > latest:
                raise NoUpdatePathError(f"version {from_version} is newer than the latest stored, {latest}")
            if from_version == latest:
                return []
            candidates = []
            if from_version is not None:
                deltas = self._delta_chain(from_version, latest)
                if deltas is not None:
                    candidates.append(deltas)
            newest_keyframe = max(version for version, codec in self._versions if codec == Codec.KEYFRAME)
            after_keyframe = self._delta_chain(newest_keyframe, latest)
            assert after_keyframe is not None, "every version after the newest keyframe has a delta"
            candidates.append([self._versions[(newest_keyframe, Codec.KEYFRAME)], *after_keyframe])
            best = min(candidates, key=lambda path: _blob_bytes([manifest for _, manifest in path]))
            return [signed for signed, _ in best]

    def _delta_chain(self, from_version: int, to_version: int) -> list[tuple[SignedManifest, PolicyManifest]] | None:
        """Deltas taking `from_version` to `to_version`, one for every stored version between."""
        chain = []
        previous = from_version
        for version in sorted({version for version, _ in self._versions if from_version < version <= to_version}):
            entry = self._versions.get((version, Codec.DELTA))
            if entry is None or entry[1].base_version != previous:
                return None
            chain.append(entry)
            previous = version
        return chain

    def reload(self) -> None:
        """Read the stored versions again from disk: what another coordinator process on the same
        data directory (a replica) published or dropped since."""
        with self._lock:
            self._versions.clear()
            self._load()

    # ---- writing ----

    def put_blob(self, expected_hash: bytes, data: bytes) -> bool:
        """Store one uploaded blob ahead of its manifest; False if it was already stored.
        A blob no manifest names is removed when the store next opens."""
        if len(data) > MAX_BLOB_BYTES:
            raise BlobStoreError(f"blob has {len(data)} bytes, more than the {MAX_BLOB_BYTES} a blob may have")
        if compute_blob_hash(data) != expected_hash:
            raise BlobStoreError(f"uploaded bytes do not hash to {expected_hash.hex()}")
        if self.has_blob(expected_hash):
            return False
        _write_atomically(self.blob_path(expected_hash), data)
        return True

    def put_version(self, signed: SignedManifest, blobs: Mapping[bytes, bytes]) -> PolicyManifest:
        """Check and store one published version with its blobs (by hash; blobs already
        stored may be left out), then apply retention. Storing the same signed manifest
        again is a no-op."""
        manifest = verify_manifest(signed, self.trainer_public_key)
        if manifest.run_id != self.run_id:
            raise VersionOrderError(f"manifest is for run {manifest.run_id!r}, this store holds {self.run_id!r}")
        with self._lock:
            key = (manifest.version, manifest.codec)
            if key in self._versions:
                if self._versions[key][0] == signed:
                    return manifest
                raise VersionOrderError(
                    f"a different {_CODEC_NAMES[manifest.codec]} for version {manifest.version} is stored"
                )
            self._check_order(manifest)
            for ref in manifest.blobs:
                if ref.hash in blobs:
                    check_blob(ref, blobs[ref.hash])
                elif not self.has_blob(ref.hash):
                    raise UnknownBlobError(f"blob {ref.hash.hex()} is neither given nor stored")
            for ref in manifest.blobs:
                if ref.hash in blobs and not self.has_blob(ref.hash):
                    _write_atomically(self.blob_path(ref.hash), bytes(blobs[ref.hash]))
            _write_atomically(self._manifest_path(*key), signed_manifest_to_bytes(signed))
            self._versions[key] = (signed, manifest)
            self._apply_retention()
        return manifest

    def _check_order(self, manifest: PolicyManifest) -> None:
        latest = self.latest_version()
        if latest is None:
            if manifest.codec != Codec.KEYFRAME:
                raise VersionOrderError("the first version in the store must be a keyframe")
            return
        if manifest.version < latest:
            raise VersionOrderError(f"version {manifest.version} is older than the latest stored, {latest}")
        previous = (
            latest
            if manifest.version > latest
            else max((version for version, _ in self._versions if version < latest), default=None)
        )
        if manifest.codec == Codec.DELTA and manifest.base_version != previous:
            raise VersionOrderError(
                f"delta to version {manifest.version} is against version {manifest.base_version}; "
                f"the store's version before it is {previous}"
            )

    def _manifest_path(self, version: int, codec: Codec) -> Path:
        return self._manifest_dir / f"{version:012d}.{_CODEC_NAMES[codec]}"

    def _apply_retention(self) -> None:
        keyframes = sorted(version for version, codec in self._versions if codec == Codec.KEYFRAME)
        if len(keyframes) <= self.num_keyframes_kept:
            return
        oldest_kept = keyframes[-self.num_keyframes_kept]
        dropped = [
            key for key in self._versions if key[0] < oldest_kept or (key[0] == oldest_kept and key[1] == Codec.DELTA)
        ]
        dropped_hashes = {ref.hash for key in dropped for ref in self._versions[key][1].blobs}
        for key in dropped:
            self._manifest_path(*key).unlink(missing_ok=True)
            del self._versions[key]
        self._collect_unreferenced_blobs(dropped_hashes)

    def _referenced_hashes(self) -> set[bytes]:
        return {ref.hash for _, manifest in self._versions.values() for ref in manifest.blobs}

    def _stored_blob_hashes(self) -> set[bytes]:
        return {bytes.fromhex(path.name) for path in self._blob_dir.glob("*/*") if _BLOB_NAME.match(path.name)}

    def _collect_unreferenced_blobs(self, candidates: set[bytes]) -> None:
        for blob_hash in candidates - self._referenced_hashes():
            self.blob_path(blob_hash).unlink(missing_ok=True)

    def _load(self) -> None:
        for path in sorted(self._manifest_dir.iterdir()):
            match = _MANIFEST_NAME.match(path.name)
            if match is None:
                continue
            try:
                signed = signed_manifest_from_bytes(path.read_bytes())
                manifest = verify_manifest(signed, self.trainer_public_key)
            except PolicyUpdateError as error:
                raise BlobStoreError(f"stored manifest {path} does not verify: {error}") from None
            codec = Codec.KEYFRAME if match.group(2) == "keyframe" else Codec.DELTA
            if (manifest.version, manifest.codec, manifest.run_id) != (int(match.group(1)), codec, self.run_id):
                raise BlobStoreError(f"stored manifest {path} does not match its file name or run {self.run_id!r}")
            self._versions[(manifest.version, codec)] = (signed, manifest)
