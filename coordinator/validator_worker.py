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
from coordinator.policy_history import PolicyHistory
from coordinator.validation import GroupChecker, job_from_proto, verdict_to_proto
from protocol import convert
from protocol.channel import open_channel
from protocol.proto import service_pb2, service_pb2_grpc, validation_pb2, validation_pb2_grpc
from protocol.retry import RetryPolicy, call_with_retry
from protocol.tls import CoordinatorTls
from protocol.types import SignedManifest

log = logging.getLogger(__name__)

RPC_TIMEOUT_S = 60.0
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
# Policy updates are fetched inside a check, which holds its groups' lease: a few tries, then the
# check fails and the groups go back to the coordinator.
POLICY_FETCH_RETRY = RetryPolicy(initial_backoff_s=0.5, max_backoff_s=8.0, max_attempts=5)


@dataclass(frozen=True)
class ValidatorSettings:
    coordinator: str  # gRPC HOST:PORT
    operator_token: str
    model_dir: Path  # the run's model directory (config and tokenizer; weights come from the coordinator)
    validator_id: str
    max_groups: int = 64  # groups taken (and replayed together) at once
    idle_s: float = 0.5  # wait between polls when there is no work
    device: str = "cpu"  # where the replay runs: cpu, cuda or cuda:N
    tls: CoordinatorTls = CoordinatorTls()  # how the coordinator's certificate is checked

    def __post_init__(self) -> None:
        if not self.operator_token:
            raise ValueError("a validator needs the coordinator's operator token")
        if self.max_groups < 1:
            raise ValueError(f"max_groups must be >= 1, got {self.max_groups}")


class RemotePolicySource:
    """Signed updates and blobs from the coordinator's public NodeService."""

    def __init__(self, stub: service_pb2_grpc.NodeServiceStub, address: str):
        self.stub = stub
        self.address = address

    def update_path(self, from_version: int | None) -> list[SignedManifest]:
        request = service_pb2.UpdatePathRequest(from_version=from_version or 0)
        try:
            path = call_with_retry(
                lambda: self.stub.GetUpdatePath(request, timeout=RPC_TIMEOUT_S),
                address=self.address,
                what="update path",
                policy=POLICY_FETCH_RETRY,
            )
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                raise NoUpdatePathError(error.details()) from None
            raise
        return [convert.signed_manifest_from_proto(m) for m in path.manifests]

    def read_blob(self, blob_hash: bytes) -> bytes:
        """The blob's bytes; open_update checks them against the signed manifest's hash. A retry
        resumes from the bytes received."""
        data = bytearray()

        def fetch_rest() -> None:
            request = service_pb2.BlobRequest(hash=blob_hash, offset=len(data))
            for chunk in self.stub.FetchBlob(request, timeout=RPC_TIMEOUT_S):
                if chunk.offset != len(data):
                    raise ValueError(
                        f"blob {blob_hash.hex()[:16]}: chunk at offset {chunk.offset}, expected {len(data)}"
                    )
                data.extend(chunk.data)

        call_with_retry(
            fetch_rest, address=self.address, what=f"fetch blob {blob_hash.hex()[:16]}", policy=POLICY_FETCH_RETRY
        )
        return bytes(data)


def run_validator(settings: ValidatorSettings, stop: threading.Event) -> None:
    """Take, check and report until `stop` is set."""
    metadata = (("authorization", f"Bearer {settings.operator_token}"),)
    with open_channel(settings.coordinator, settings.tls, max_message_bytes=MAX_MESSAGE_BYTES) as channel:
        nodes = service_pb2_grpc.NodeServiceStub(channel)
        work = validation_pb2_grpc.ValidatorServiceStub(channel)
        run_info = call_with_retry(
            lambda: nodes.GetRunInfo(service_pb2.RunInfoRequest(), timeout=RPC_TIMEOUT_S),
            address=settings.coordinator,
            what="run info",
            stop=stop,
        )
        history = PolicyHistory(
            RemotePolicySource(nodes, settings.coordinator),
            run_info.run_id,
            run_info.trainer_public_key,
            run_info.max_staleness + 1,
        )
        checker = GroupChecker(history, settings.model_dir, device=settings.device)
        log.info("validator %s working for run %s at %s", settings.validator_id, run_info.run_id, settings.coordinator)
        while not stop.is_set():
            try:
                num_taken = _take_check_report(settings, work, checker, metadata, stop)
            except grpc.RpcError as error:
                if error.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                    raise ValueError(f"the coordinator refused this validator: {error.details()}") from None
                if stop.is_set():
                    break
                # The groups' lease runs out and the coordinator hands them out again.
                log.error("validation round failed (%s): %s", error.code().name, error.details())
                num_taken = 0
            if not num_taken:
                stop.wait(settings.idle_s)


def _take_check_report(
    settings: ValidatorSettings,
    work: validation_pb2_grpc.ValidatorServiceStub,
    checker: GroupChecker,
    metadata,
    stop: threading.Event,
) -> int:
    take = validation_pb2.TakeValidationRequest(validator_id=settings.validator_id, max_groups=settings.max_groups)
    taken = call_with_retry(
        lambda: work.TakeValidation(take, metadata=metadata, timeout=RPC_TIMEOUT_S),
        address=settings.coordinator,
        what="take validation",
        stop=stop,
    )
    if not taken.jobs:
        return 0
    jobs = [job_from_proto(job) for job in taken.jobs]
    verdicts = checker.check(jobs)
    report = validation_pb2.ReportValidationRequest(
        validator_id=settings.validator_id,
        verdicts=[verdict_to_proto(job.group_id, v) for job, v in zip(jobs, verdicts, strict=True)],
    )
    answer = call_with_retry(
        lambda: work.ReportValidation(report, metadata=metadata, timeout=RPC_TIMEOUT_S),
        address=settings.coordinator,
        what="report validation",
        stop=stop,
    )
    log.info(
        "validator %s: %d groups checked (%d failed), %d verdicts applied",
        settings.validator_id,
        len(jobs),
        sum(not v.passed for v in verdicts),
        answer.num_applied,
    )
    return len(jobs)
