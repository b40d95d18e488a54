"""The node's gRPC client: signs every request, fetches blobs with resume."""

from __future__ import annotations

import hashlib

import grpc
from google.protobuf.message import Message

from protocol import convert
from protocol.channel import open_aio_channel
from protocol.envelope import method_name, seal
from protocol.identity import Identity
from protocol.proto import rollout_pb2, service_pb2, service_pb2_grpc
from protocol.retry import RetryPolicy, call_with_retry_async
from protocol.tls import CoordinatorTls
from protocol.types import SignedManifest

BLOB_FETCH_RETRY = RetryPolicy(initial_backoff_s=0.5, max_backoff_s=4.0, max_attempts=3)


class BlobFetchError(ValueError):
    """A blob could not be fetched whole with the expected hash."""


class CoordinatorClient:
    def __init__(
        self,
        address: str,
        identity: Identity,
        *,
        tls: CoordinatorTls = CoordinatorTls(),
        max_message_bytes: int = 64 * 1024 * 1024,
    ):
        self.address = address
        self.identity = identity
        self.channel = open_aio_channel(address, tls, max_message_bytes=max_message_bytes)
        self.stub = service_pb2_grpc.NodeServiceStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    def _sealed(self, method: str, request: Message):
        return seal(self.identity, method_name("NodeService", method), request.SerializeToString())

    async def run_info(self, timeout: float = 10.0) -> service_pb2.RunInfo:
        return await self.stub.GetRunInfo(service_pb2.RunInfoRequest(), timeout=timeout)

    async def register(self, request: service_pb2.RegisterRequest, timeout: float = 10.0):
        return await self.stub.Register(self._sealed("Register", request), timeout=timeout)

    async def heartbeat(self, request: service_pb2.HeartbeatRequest, timeout: float = 10.0):
        return await self.stub.Heartbeat(self._sealed("Heartbeat", request), timeout=timeout)

    async def lease(self, policy_version: int, timeout: float = 10.0) -> service_pb2.LeaseResponse:
        return await self.stub.LeaseWork(
            self._sealed("LeaseWork", service_pb2.LeaseRequest(policy_version=policy_version)), timeout=timeout
        )

    async def submit(self, payload: bytes, timeout: float = 60.0) -> rollout_pb2.Receipt:
        """Submit a serialized RolloutBatch: the payload is signed as is, so a re-send of the
        same bytes has the same batch hash and gets the stored receipt."""
        envelope = seal(self.identity, method_name("NodeService", "SubmitRollouts"), payload)
        return await self.stub.SubmitRollouts(envelope, timeout=timeout)

    async def release(self, lease_id: str, timeout: float = 10.0) -> None:
        await self.stub.ReleaseLease(
            self._sealed("ReleaseLease", service_pb2.ReleaseLeaseRequest(lease_id=lease_id)), timeout=timeout
        )

    async def standing(self, timeout: float = 10.0) -> service_pb2.NodeStanding:
        return await self.stub.GetNodeStanding(
            self._sealed("GetNodeStanding", service_pb2.NodeStandingRequest()), timeout=timeout
        )

    async def update_path(self, from_version: int, timeout: float = 30.0) -> list[SignedManifest]:
        path = await self.stub.GetUpdatePath(service_pb2.UpdatePathRequest(from_version=from_version), timeout=timeout)
        return [convert.signed_manifest_from_proto(m) for m in path.manifests]

    async def fetch_blob(
        self, blob_hash: bytes, size: int, *, policy: RetryPolicy = BLOB_FETCH_RETRY, timeout: float = 120.0
    ) -> bytes:
        """The blob with this SHA-256; a retry resumes from the bytes received when a stream breaks."""
        received = bytearray()

        async def fetch_rest() -> None:
            stream = self.stub.FetchBlob(service_pb2.BlobRequest(hash=blob_hash, offset=len(received)), timeout=timeout)
            async for chunk in stream:
                if chunk.offset != len(received):
                    raise BlobFetchError(f"chunk at offset {chunk.offset}, expected {len(received)}")
                received.extend(chunk.data)
                if len(received) > size:
                    raise BlobFetchError(f"blob {blob_hash.hex()[:16]} is longer than its declared {size} bytes")

        try:
            await call_with_retry_async(
                fetch_rest, address=self.address, what=f"fetch blob {blob_hash.hex()[:16]}", policy=policy
            )
        except grpc.aio.AioRpcError as error:
            raise BlobFetchError(
                f"blob {blob_hash.hex()[:16]}: got {len(received)} of {size} bytes "
                f"({error.code().name}: {error.details()})"
            ) from None
        if len(received) != size:
            raise BlobFetchError(f"blob {blob_hash.hex()[:16]}: got {len(received)} of {size} bytes")
        if hashlib.sha256(received).digest() != blob_hash:
            raise BlobFetchError(f"blob {blob_hash.hex()[:16]} does not match its hash")
        return bytes(received)
