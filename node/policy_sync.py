"""Following the policy: fetch the update path, check every manifest and blob, apply in
place. On any failure the node keeps the policy it has and says why."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc

from node.client import BlobFetchError, CoordinatorClient
from policy.weights import NodePolicy
from protocol.manifest import MissingBaseError, PolicyUpdateError, verify_manifest
from protocol.proto import service_pb2

log = logging.getLogger(__name__)


class PolicySync:
    def __init__(self, model: Any, client: CoordinatorClient, run_info: service_pb2.RunInfo):
        self.client = client
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
                blobs = dict(
                    zip(
                        [ref.hash for ref in manifest.blobs],
                        await asyncio.gather(
                            *(self.client.fetch_blob(ref.hash, ref.size) for ref in manifest.blobs)
                        ),
                    )
                )
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
