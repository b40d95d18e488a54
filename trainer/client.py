"""The trainer's gRPC client: signed calls to the coordinator's TrainerService, and a
policy sink that uploads blobs then publishes the signed manifest. Every call rides out a
coordinator restart of any length under the one retry policy (protocol/retry.py); every call is
safe to repeat (acks, metrics and publishing a signed manifest are idempotent)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from typing import TypeVar

from google.protobuf.message import Message

from protocol import convert
from protocol.channel import open_channel
from protocol.envelope import method_name, seal
from protocol.identity import Identity
from protocol.proto import service_pb2, service_pb2_grpc
from protocol.retry import RetryPolicy, call_with_retry
from protocol.tls import CoordinatorTls
from protocol.types import ReadyGroup, SignedManifest

UPLOAD_CHUNK_BYTES = 1024 * 1024
# The coordinator's one trainer: its waits are the run's idle time, so its backoff stops sooner.
TRAINER_RETRY = RetryPolicy(max_backoff_s=10.0)

T = TypeVar("T")


class TrainerClient:
    def __init__(
        self,
        address: str,
        identity: Identity,
        *,
        tls: CoordinatorTls = CoordinatorTls(),
        max_message_bytes: int = 64 * 1024 * 1024,
        stop: threading.Event | None = None,
    ):
        """stop: once set, a call the coordinator does not answer raises instead of retrying."""
        self.address = address
        self.identity = identity
        self.stop = stop
        self.channel = open_channel(address, tls, max_message_bytes=max_message_bytes)
        self.stub = service_pb2_grpc.TrainerServiceStub(self.channel)
        self.node_stub = service_pb2_grpc.NodeServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def _sealed(self, method: str, request: Message):
        return seal(self.identity, method_name("TrainerService", method), request.SerializeToString())

    def _retried(self, what: str, call: Callable[[], T]) -> T:
        """`call` (which seals afresh: a retry carries a new nonce) under the retry policy."""
        return call_with_retry(call, address=self.address, what=what, policy=TRAINER_RETRY, stop=self.stop)

    def run_info(self, timeout: float = 30.0) -> service_pb2.RunInfo:
        return self._retried(
            "run info",
            lambda: self.node_stub.GetRunInfo(service_pb2.RunInfoRequest(), timeout=timeout, wait_for_ready=True),
        )

    def ready_groups(self, max_groups: int, max_staleness: int, timeout: float = 60.0) -> list[ReadyGroup]:
        request = service_pb2.StreamGroupsRequest(max_groups=max_groups, max_staleness=max_staleness)

        def stream_groups() -> list[ReadyGroup]:
            stream = self.stub.StreamGroups(self._sealed("StreamGroups", request), timeout=timeout)
            return [convert.ready_group_from_proto(message) for message in stream]

        return self._retried("stream groups", stream_groups)

    def ack(self, trainer_step: int, consumed: list[str], stale: list[str]) -> service_pb2.AckResponse:
        request = service_pb2.AckRequest(trainer_step=trainer_step, consumed_group_ids=consumed, stale_group_ids=stale)
        return self._retried("ack", lambda: self.stub.AckGroups(self._sealed("AckGroups", request), timeout=30.0))

    def resume(self, trainer_step: int) -> service_pb2.ResumeResponse:
        request = service_pb2.ResumeRequest(trainer_step=trainer_step)
        return self._retried("resume", lambda: self.stub.Resume(self._sealed("Resume", request), timeout=30.0))

    def report_metrics(self, step: int, metrics_json: str) -> None:
        request = service_pb2.TrainerMetrics(step=step, metrics_json=metrics_json)
        self._retried(
            "report metrics", lambda: self.stub.ReportMetrics(self._sealed("ReportMetrics", request), timeout=30.0)
        )

    def _upload_parts(self, blob_hash: bytes, data: bytes) -> Iterator[service_pb2.BlobUpload]:
        header = service_pb2.BlobUploadHeader(hash=blob_hash, size=len(data))
        yield service_pb2.BlobUpload(header=self._sealed("UploadBlob", header))
        for start in range(0, len(data), UPLOAD_CHUNK_BYTES):
            yield service_pb2.BlobUpload(data=data[start : start + UPLOAD_CHUNK_BYTES])

    def _upload(self, blob_hash: bytes, data: bytes) -> None:
        self._retried("upload blob", lambda: self.stub.UploadBlob(self._upload_parts(blob_hash, data), timeout=300.0))

    def put_version(self, signed: SignedManifest, blobs: Mapping[bytes, bytes]) -> int:
        """The PolicySink of trainer/publish.py: upload every blob, then publish the manifest."""
        for blob_hash, data in blobs.items():
            self._upload(blob_hash, bytes(data))
        request = service_pb2.PublishRequest(manifest=convert.signed_manifest_to_proto(signed))
        return self._retried(
            "publish", lambda: self.stub.PublishPolicy(self._sealed("PublishPolicy", request), timeout=60.0)
        ).version
