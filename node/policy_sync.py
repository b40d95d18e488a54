"""Following the policy: fetch the update path, check every manifest and blob, apply in
place. On any failure the node keeps the policy it has and says why."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from typing import Any

import grpc
import trio

from p2p import P2PHostError
from p2p.service import BlobFetchError as PeerFetchError

from node.client import BlobFetchError, CoordinatorClient
from policy.weights import NodePolicy
from protocol.manifest import MissingBaseError, PolicyUpdateError, verify_manifest
from protocol.proto import service_pb2

log = logging.getLogger(__name__)


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
    def __init__(self, model: Any, client: CoordinatorClient, run_info: service_pb2.RunInfo, peers=None):
        """peers: a started p2p.P2PHost to fetch blobs from other nodes first, or None."""
        self.client = client
        self.peers = peers
        self.trainer_public_key = run_info.trainer_public_key
        self.node_policy = NodePolicy(model, run_id=run_info.run_id, trainer_public_key=run_info.trainer_public_key)
        self.last_error = ""

    @property
    def version(self) -> int:
        """The version held; 0 before the first keyframe."""
        return self.node_policy.version or 0

    async def sync(self, call) -> bool:
        """Move to the latest version if there is a newer one; True when the policy changed.
        `call(what, make_call)` runs an RPC with the daemon's retry policy."""
        changed = False
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
                log.warning("%s; fetching the keyframe path", error)
                path = await call("update path", lambda: self.client.update_path(0))
                continue
            except (PolicyUpdateError, BlobFetchError) as error:
                self.last_error = f"{type(error).__name__}: {error}"
                log.error("policy update refused, keeping version %d: %s", self.version, error)
                return changed
            log.info("policy version %d applied (%s)", manifest.version, manifest.codec.name.lower())
            changed = True
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
                log.warning("peer network could not deliver version %d (%s); fetching from the coordinator",
                            manifest.version, error)
        fetched = await asyncio.gather(*(self.client.fetch_blob(h, n) for h, n in zip(hashes, sizes)))
        return dict(zip(hashes, fetched))
