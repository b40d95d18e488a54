"""Following the policy: fetch the update path, check every manifest and blob, apply in
place. On any failure the node keeps the policy it has and says why. Every
`full_check_interval` deltas the node rehashes its whole state (a delta's result is not
rehashed: protocol/manifest.py); a mismatch sends it through the keyframe path."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import grpc
import trio

from node.client import BlobFetchError, CoordinatorClient
from p2p import BlobFetchError as PeerFetchError
from p2p import P2PHostError
from policy.weights import NodePolicy
from protocol.manifest import (
    BaseStateMismatchError,
    MissingBaseError,
    PolicyUpdateError,
    StateHashMismatchError,
    verify_manifest,
)
from protocol.proto import service_pb2
from protocol.retry import RetryPolicy

log = logging.getLogger(__name__)

# Rehashing 2 bytes per weight costs about what applying 20 deltas does.
DEFAULT_FULL_CHECK_INTERVAL = 20
# After a refused update the node keeps its policy and tries again only after this backoff
# (per consecutive refusal), so a broken update path costs a few calls, not a loop of them.
REFUSED_UPDATE_BACKOFF = RetryPolicy(initial_backoff_s=1.0, max_backoff_s=30.0)


class BlobCache:
    """Blobs this node fetched, served to its peers; the oldest go first past `max_bytes`."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._blobs: OrderedDict[bytes, bytes] = OrderedDict()
        self._num_bytes = 0
        self._lock = threading.Lock()

    def get(self, blob_hash: bytes) -> bytes | None:
        with self._lock:
            return self._blobs.get(blob_hash)

    def put(self, blob_hash: bytes, data: bytes) -> None:
        with self._lock:
            if blob_hash in self._blobs:
                return
            self._blobs[blob_hash] = data
            self._num_bytes += len(data)
            while self._num_bytes > self.max_bytes and len(self._blobs) > 1:
                _, dropped = self._blobs.popitem(last=False)
                self._num_bytes -= len(dropped)


class PolicySync:
    def __init__(
        self,
        model: Any,
        client: CoordinatorClient,
        run_info: service_pb2.RunInfo,
        peers=None,
        *,
        full_check_interval: int = DEFAULT_FULL_CHECK_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ):
        """peers: a started p2p.P2PHost to fetch blobs from other nodes first, or None."""
        if full_check_interval < 1:
            raise ValueError("full_check_interval must be at least 1")
        self.client = client
        self.peers = peers
        self.trainer_public_key = run_info.trainer_public_key
        self.node_policy = NodePolicy(model, run_id=run_info.run_id, trainer_public_key=run_info.trainer_public_key)
        self.full_check_interval = full_check_interval
        self.last_error = ""
        self.clock = clock
        self.num_refusals_in_row = 0
        self._next_attempt_at = 0.0

    @property
    def version(self) -> int:
        """The version held; 0 before the first keyframe."""
        return self.node_policy.version or 0

    async def sync(self, call) -> bool:
        """Move to the latest version if there is a newer one; True when the policy changed.
        `call(what, make_call)` runs an RPC with the daemon's retry policy."""
        changed = await self._follow(call)
        if self.node_policy.num_unchecked_deltas >= self.full_check_interval and not await self._state_intact():
            changed = await self._follow(call) or changed
        return changed

    async def _state_intact(self) -> bool:
        """Rehash the full state; False (and the version forgotten) if it lost its hash."""
        try:
            await asyncio.to_thread(self.node_policy.check_state_hash)
        except StateHashMismatchError as error:
            self.last_error = f"{type(error).__name__}: {error}"
            log.error("%s", error)
            return False
        return True

    def _refused(self, error: Exception, changed: bool) -> bool:
        self.last_error = f"{type(error).__name__}: {error}"
        self.num_refusals_in_row += 1
        backoff_s = REFUSED_UPDATE_BACKOFF.backoff_s(self.num_refusals_in_row)
        self._next_attempt_at = self.clock() + backoff_s
        log.error("policy update refused, keeping version %d; next try in %.1fs: %s", self.version, backoff_s, error)
        return changed

    async def _follow(self, call) -> bool:
        """Apply the update path; after a refusal, nothing until its backoff has passed."""
        if self.clock() < self._next_attempt_at:
            return False
        changed = False
        fell_back_to_keyframe = False
        try:
            path = await call("update path", lambda: self.client.update_path(self.version))
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                raise
            log.info("no policy to follow yet: %s", error.details())
            return False
        while path:
            signed = path.pop(0)
            try:
                manifest = verify_manifest(signed, self.trainer_public_key)
                blobs = await self._fetch(manifest)
                await asyncio.to_thread(self.node_policy.apply, signed, blobs)
            except MissingBaseError as error:
                # A delta made against other contents of this node's version: the keyframe
                # path helps only if this node's own state lost its hash.
                if fell_back_to_keyframe or (isinstance(error, BaseStateMismatchError) and await self._state_intact()):
                    return self._refused(error, changed)
                log.warning("%s; fetching the keyframe path", error)
                fell_back_to_keyframe = True
                path = await call("update path", lambda: self.client.update_path(0))
                continue
            except (PolicyUpdateError, BlobFetchError) as error:
                return self._refused(error, changed)
            log.info("policy version %d applied (%s)", manifest.version, manifest.codec.name.lower())
            changed = True
        self.num_refusals_in_row = 0
        return changed

    async def _fetch(self, manifest) -> dict[bytes, bytes]:
        """The manifest's blobs: from peers (the seed as their origin of last resort) when the
        peer network is on, else, or when it fails, from the coordinator over gRPC."""
        hashes, sizes = [ref.hash for ref in manifest.blobs], [ref.size for ref in manifest.blobs]
        if self.peers is not None:
            try:
                blobs = await asyncio.to_thread(self.peers.fetch_blobs, hashes, sizes)
                log.info("policy version %d: %d blobs fetched through the peer network", manifest.version, len(blobs))
                return blobs
            except (PeerFetchError, P2PHostError, trio.TooSlowError) as error:
                log.warning(
                    "peer network could not deliver version %d (%s); fetching from the coordinator",
                    manifest.version,
                    error,
                )
        fetched = await asyncio.gather(*(self.client.fetch_blob(h, n) for h, n in zip(hashes, sizes, strict=True)))
        return dict(zip(hashes, fetched, strict=True))
