"""`rollproof validator run`: a validator in its own process. It takes groups waiting for a full
check from a coordinator's ValidatorService (leased to it for a while), rebuilds the claimed policy
versions from the coordinator's signed updates, checks the groups exactly as the validator inside
the coordinator does, and reports the verdicts, which the coordinator applies."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

from coordinator.blobstore import NoUpdatePathError
from coordinator.validation import GroupChecker, PolicyHistory, job_from_proto, verdict_to_proto
from protocol import convert
from protocol.proto import service_pb2, service_pb2_grpc, validation_pb2, validation_pb2_grpc
from protocol.types import SignedManifest

log = logging.getLogger(__name__)

RPC_TIMEOUT_S = 60.0
MAX_MESSAGE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class ValidatorSettings:
    coordinator: str  # gRPC HOST:PORT
    operator_token: str
    model_dir: Path  # the run's model directory (config and tokenizer; weights come from the coordinator)
    validator_id: str
    max_groups: int = 64  # groups taken (and replayed together) at once
    idle_s: float = 0.5  # wait between polls when there is no work
    device: str = "cpu"  # where the replay runs: cpu, cuda or cuda:N

    def __post_init__(self) -> None:
        if not self.operator_token:
            raise ValueError("a validator needs the coordinator's operator token")
        if self.max_groups < 1:
            raise ValueError(f"max_groups must be >= 1, got {self.max_groups}")


class RemotePolicySource:
    """Signed updates and blobs from the coordinator's public NodeService."""

    def __init__(self, stub: service_pb2_grpc.NodeServiceStub):
        self.stub = stub

    def update_path(self, from_version: int | None) -> list[SignedManifest]:
        try:
            path = self.stub.GetUpdatePath(service_pb2.UpdatePathRequest(from_version=from_version or 0),
                                           timeout=RPC_TIMEOUT_S)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                raise NoUpdatePathError(error.details()) from None
            raise
        return [convert.signed_manifest_from_proto(m) for m in path.manifests]

    def read_blob(self, blob_hash: bytes) -> bytes:
        """The blob's bytes; open_update checks them against the signed manifest's hash."""
        data = bytearray()
        for chunk in self.stub.FetchBlob(service_pb2.BlobRequest(hash=blob_hash), timeout=RPC_TIMEOUT_S):
            if chunk.offset != len(data):
                raise ValueError(f"blob {blob_hash.hex()[:16]}: chunk at offset {chunk.offset}, expected {len(data)}")
            data.extend(chunk.data)
        return bytes(data)


def run_validator(settings: ValidatorSettings, stop: threading.Event) -> None:
    """Take, check and report until `stop` is set."""
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
    metadata = (("authorization", f"Bearer {settings.operator_token}"),)
    with grpc.insecure_channel(settings.coordinator, options=options) as channel:
        nodes = service_pb2_grpc.NodeServiceStub(channel)
        work = validation_pb2_grpc.ValidatorServiceStub(channel)
        run_info = nodes.GetRunInfo(service_pb2.RunInfoRequest(), timeout=RPC_TIMEOUT_S)
        history = PolicyHistory(RemotePolicySource(nodes), run_info.run_id, run_info.trainer_public_key,
                                run_info.max_staleness + 1)
        checker = GroupChecker(history, settings.model_dir, device=settings.device)
        log.info("validator %s working for run %s at %s", settings.validator_id, run_info.run_id, settings.coordinator)
        while not stop.is_set():
            try:
                num_taken = _take_check_report(settings, work, checker, metadata)
            except grpc.RpcError as error:
                if error.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                    raise ValueError(f"the coordinator refused this validator: {error.details()}") from None
                log.warning("coordinator unavailable (%s); retrying", error.code().name)
                num_taken = 0
            if not num_taken:
                stop.wait(settings.idle_s)


def _take_check_report(settings: ValidatorSettings, work: validation_pb2_grpc.ValidatorServiceStub,
                       checker: GroupChecker, metadata) -> int:
    taken = work.TakeValidation(
        validation_pb2.TakeValidationRequest(validator_id=settings.validator_id, max_groups=settings.max_groups),
        metadata=metadata, timeout=RPC_TIMEOUT_S)
    if not taken.jobs:
        return 0
    jobs = [job_from_proto(job) for job in taken.jobs]
    verdicts = checker.check(jobs)
    answer = work.ReportValidation(validation_pb2.ReportValidationRequest(
        validator_id=settings.validator_id,
        verdicts=[verdict_to_proto(job.group_id, v) for job, v in zip(jobs, verdicts)],
    ), metadata=metadata, timeout=RPC_TIMEOUT_S)
    log.info("validator %s: %d groups checked (%d failed), %d verdicts applied", settings.validator_id,
             len(jobs), sum(not v.passed for v in verdicts), answer.num_applied)
    return len(jobs)
