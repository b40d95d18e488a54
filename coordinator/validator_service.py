"""The gRPC side of validation work: `rollproof validator run` processes take leased groups and
report verdicts, with the operator token (validators are the operator's, hence trusted)."""

from __future__ import annotations

import asyncio
import logging

import grpc

from coordinator.gate import Gate, GateError, peer_host
from coordinator.transport import require_private_transport
from coordinator.validation import ValidationQueue, job_to_proto, verdict_from_proto
from protocol.proto import validation_pb2, validation_pb2_grpc

log = logging.getLogger(__name__)

MAX_GROUPS_PER_TAKE = 256
# Evidence is stored with the verdict and shown on the dashboard; a validator's is a few numbers.
MAX_EVIDENCE_CHARS = 16 * 1024


class ValidatorServicer(validation_pb2_grpc.ValidatorServiceServicer):
    def __init__(self, queue: ValidationQueue, gate: Gate):
        self.queue = queue
        self.gate = gate

    async def _authorize(self, context) -> None:
        try:
            require_private_transport(context)
            self.gate.operator(context.invocation_metadata(), peer_host(context.peer()))
        except GateError as error:
            await context.abort(error.status, str(error))

    async def TakeValidation(self, request, context):
        await self._authorize(context)
        if not request.validator_id or not 1 <= request.max_groups <= MAX_GROUPS_PER_TAKE:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"need a validator_id and 1 <= max_groups <= {MAX_GROUPS_PER_TAKE}"
            )
        jobs, deadline_ms = await asyncio.to_thread(self.queue.take, request.validator_id, request.max_groups)
        return validation_pb2.ValidationWork(jobs=[job_to_proto(job) for job in jobs], deadline_ms=deadline_ms)

    async def ReportValidation(self, request, context):
        await self._authorize(context)
        try:
            oversized = next((v for v in request.verdicts if len(v.evidence_json) > MAX_EVIDENCE_CHARS), None)
            if oversized is not None:
                raise ValueError(
                    f"the verdict on group {oversized.group_id[:80]!r}: {len(oversized.evidence_json)} characters of "
                    f"evidence, at most {MAX_EVIDENCE_CHARS}"
                )
            verdicts = [verdict_from_proto(v) for v in request.verdicts]
        except ValueError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        num_applied = await asyncio.to_thread(self.queue.report, verdicts)
        if num_applied:
            log.info("validator %s: %d verdicts applied", request.validator_id, num_applied)
        return validation_pb2.ReportValidationResponse(
            num_applied=num_applied, num_ignored=len(request.verdicts) - num_applied
        )
