"""The trainer's gRPC client: signed calls to the coordinator's TrainerService, and a
policy sink that uploads blobs then publishes the signed manifest."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import grpc
from google.protobuf.message import Message

from protocol import convert
from protocol.envelope import method_name, seal
from protocol.identity import Identity
from protocol.proto import service_pb2, service_pb2_grpc
from protocol.types import ReadyGroup, SignedManifest

UPLOAD_CHUNK_BYTES = 1024 * 1024


class TrainerClient:
    def __init__(self, address: str, identity: Identity, *, max_message_bytes: int = 64 * 1024 * 1024):
        self.identity = identity
        self.channel = grpc.insecure_channel(
            address,
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
            ],
        )
        self.stub = service_pb2_grpc.TrainerServiceStub(self.channel)
        self.node_stub = service_pb2_grpc.NodeServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def _sealed(self, method: str, request: Message):
        return seal(self.identity, method_name("TrainerService", method), request.SerializeToString())

    def run_info(self, timeout: float = 30.0) -> service_pb2.RunInfo:
        return self.node_stub.GetRunInfo(service_pb2.RunInfoRequest(), timeout=timeout, wait_for_ready=True)

    def ready_groups(self, max_groups: int, max_staleness: int, timeout: float = 60.0) -> list[ReadyGroup]:
        request = service_pb2.StreamGroupsRequest(max_groups=max_groups, max_staleness=max_staleness)
        stream = self.stub.StreamGroups(self._sealed("StreamGroups", request), timeout=timeout)
        return [convert.ready_group_from_proto(message) for message in stream]

    def ack(self, trainer_step: int, consumed: list[str], stale: list[str]) -> service_pb2.AckResponse:
        request = service_pb2.AckRequest(trainer_step=trainer_step, consumed_group_ids=consumed, stale_group_ids=stale)
        return self.stub.AckGroups(self._sealed("AckGroups", request), timeout=30.0)

    def resume(self, trainer_step: int) -> service_pb2.ResumeResponse:
        return self.stub.Resume(self._sealed("Resume", service_pb2.ResumeRequest(trainer_step=trainer_step)), timeout=30.0)

    def report_metrics(self, step: int, metrics_json: str) -> None:
        request = service_pb2.TrainerMetrics(step=step, metrics_json=metrics_json)
        self.stub.ReportMetrics(self._sealed("ReportMetrics", request), timeout=30.0)

    def _upload_parts(self, blob_hash: bytes, data: bytes) -> Iterator[service_pb2.BlobUpload]:
        header = service_pb2.BlobUploadHeader(hash=blob_hash, size=len(data))
        yield service_pb2.BlobUpload(header=self._sealed("UploadBlob", header))
        for start in range(0, len(data), UPLOAD_CHUNK_BYTES):
            yield service_pb2.BlobUpload(data=data[start : start + UPLOAD_CHUNK_BYTES])

    def put_version(self, signed: SignedManifest, blobs: Mapping[bytes, bytes]) -> int:
        """The PolicySink of trainer/publish.py: upload every blob, then publish the manifest."""
        for blob_hash, data in blobs.items():
            self.stub.UploadBlob(self._upload_parts(blob_hash, bytes(data)), timeout=300.0)
        request = service_pb2.PublishRequest(manifest=convert.signed_manifest_to_proto(signed))
        return self.stub.PublishPolicy(self._sealed("PublishPolicy", request), timeout=60.0).version
