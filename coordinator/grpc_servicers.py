"""Thin gRPC servicers: verify through the Gate, convert, call the Coordinator in a worker
thread, convert back. No decisions are made here. The node's hot calls (lease, submit) make
one trip to the thread pool for all of it.

Every RPC passes the GuardInterceptor first: a request that does not parse or exceeds the
schema's bounds is refused with INVALID_ARGUMENT, an error nobody expected with INTERNAL (never
UNKNOWN), each logged as one line, and every refusal is counted by method and status."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable

import grpc
from google.protobuf.message import DecodeError
from prometheus_client import Histogram

from coordinator.blobstore import BlobHashError, BlobRangeError, BlobStoreError
from coordinator.core import SETTLE_WINDOW_MS, Coordinator, InvalidRequestError, LeaseWait
from coordinator.dashboard.views import DashboardData
from coordinator.gate import Gate, GateError, RefusalCounts, peer_host
from coordinator.remedies import remedy
from coordinator.store import GroupState, LeaseCapError, NodeRecord, UnknownNodeError
from coordinator.transport import require_private_transport
from envs.sandbox import SandboxBusyError
from protocol import convert
from protocol.convert import WireFormatError
from protocol.envelope import method_name
from protocol.identity import key_id
from protocol.manifest import MAX_BLOB_BYTES, PolicyUpdateError
from protocol.proto import rollout_pb2, service_pb2, service_pb2_grpc
from protocol.retry import RETRY_AFTER_METADATA_KEY
from protocol.types import NodeState

log = logging.getLogger(__name__)
RANK_REFRESH_S = 30.0


# How much of an error's text goes into one log line.
MAX_LOGGED_CHARS = 200


def _status_of(error: Exception) -> grpc.StatusCode | None:
    """The status code of an error a request can cause; None for an unexpected one."""
    if isinstance(error, GateError):
        return error.status
    if isinstance(error, (InvalidRequestError, UnknownNodeError, BlobHashError, BlobRangeError)):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(error, (LeaseCapError, SandboxBusyError)):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(error, BlobStoreError):
        return grpc.StatusCode.NOT_FOUND
    return None


# The longest wait a refusal's retry hint asks for; the retry policy reads it (protocol/retry.py).
MAX_RETRY_HINT_MS = 30_000


async def _abort(context, status: grpc.StatusCode, error: Exception) -> None:
    if isinstance(error, LeaseCapError):
        hint_ms = max(0, min(error.retry_after_ms, MAX_RETRY_HINT_MS))
        context.set_trailing_metadata(((RETRY_AFTER_METADATA_KEY, str(hint_ms)),))
    await context.abort(status, str(error))


def _guarded(handler: Callable) -> Callable:
    """Map the errors a request can cause to status codes with their messages."""

    @functools.wraps(handler)
    async def wrapper(self, request, context):
        try:
            return await handler(self, request, context)
        except Exception as error:
            status = _status_of(error)
            if status is None:
                raise
            await _abort(context, status, error)

    return wrapper


def _guarded_stream(handler: Callable) -> Callable:
    """_guarded for handlers that stream their responses."""

    @functools.wraps(handler)
    async def wrapper(self, request, context):
        try:
            async for response in handler(self, request, context):
                yield response
        except Exception as error:
            status = _status_of(error)
            if status is None:
                raise
            await _abort(context, status, error)

    return wrapper


def _peer(context) -> str:
    return peer_host(context.peer())


class _MalformedRequest:
    """What the checked deserializer returns for bytes that are not a request within bounds."""

    def __init__(self, problem: str):
        self.problem = problem


def _checked_deserializer(deserializer: Callable[[bytes], object]) -> Callable[[bytes], object]:
    def deserialize(data: bytes):
        try:
            request = deserializer(data)
            convert.check_bounds(request)
        except (DecodeError, WireFormatError) as error:
            return _MalformedRequest(str(error))
        return request

    return deserialize


async def _checked_requests(requests: AsyncIterator) -> AsyncIterator:
    async for request in requests:
        if isinstance(request, _MalformedRequest):
            raise InvalidRequestError(f"malformed request: {request.problem}")
        yield request


class GuardInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, gate: Gate, refusals: RefusalCounts, latency: Histogram):
        self.gate = gate
        self.refusals = refusals
        self.latency = latency

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        checked = handler._replace(request_deserializer=_checked_deserializer(handler.request_deserializer))
        if handler.unary_unary is not None:
            return checked._replace(unary_unary=self._unary(method, handler.unary_unary))
        if handler.unary_stream is not None:
            return checked._replace(unary_stream=self._unary_stream(method, handler.unary_stream))
        if handler.stream_unary is not None:
            return checked._replace(stream_unary=self._stream_unary(method, handler.stream_unary))
        return handler

    async def _refuse_malformed(self, method: str, request: _MalformedRequest, context) -> None:
        self.refusals.add(method, "malformed")
        log.warning(
            "%s: refused a malformed request from %s: %s", method, context.peer(), request.problem[:MAX_LOGGED_CHARS]
        )
        try:
            self.gate.unauthenticated(_peer(context))
        except GateError as error:
            await context.abort(error.status, str(error))
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {request.problem}")

    def _refused(self, method: str, context) -> None:
        code = context.code()
        self.refusals.add(method, code.name.lower() if isinstance(code, grpc.StatusCode) else "aborted")

    async def _failed(self, method: str, error: Exception, context) -> None:
        self.refusals.add(method, "internal")
        log.error(
            "%s failed on a request from %s: %s: %s",
            method,
            context.peer(),
            type(error).__name__,
            str(error)[:MAX_LOGGED_CHARS],
        )
        log.debug("%s failed", method, exc_info=error)
        await context.abort(
            grpc.StatusCode.INTERNAL, f"internal error ({type(error).__name__}); the operator's log has it"
        )

    @contextlib.asynccontextmanager
    async def _outcome_counted(self, method: str, context) -> AsyncIterator[None]:
        """Time the request and count a refusal; turn an unexpected error into one log line and
        INTERNAL."""
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            yield
        except grpc.aio.AbortError:
            self._refused(method, context)
            code = context.code() if isinstance(context.code(), grpc.StatusCode) else grpc.StatusCode.ABORTED
            raise
        except Exception as error:
            code = grpc.StatusCode.INTERNAL
            await self._failed(method, error, context)
        finally:
            self.latency.labels(method, code.name).observe(time.perf_counter() - started)

    def _unary(self, method: str, behavior: Callable) -> Callable:
        async def guarded(request, context):
            if isinstance(request, _MalformedRequest):
                await self._refuse_malformed(method, request, context)
            async with self._outcome_counted(method, context):
                return await behavior(request, context)

        return guarded

    def _unary_stream(self, method: str, behavior: Callable) -> Callable:
        async def guarded(request, context):
            if isinstance(request, _MalformedRequest):
                await self._refuse_malformed(method, request, context)
            async with self._outcome_counted(method, context):
                async for response in behavior(request, context):
                    yield response

        return guarded

    def _stream_unary(self, method: str, behavior: Callable) -> Callable:
        async def guarded(requests, context):
            async with self._outcome_counted(method, context):
                return await behavior(_checked_requests(requests), context)

        return guarded


def run_info_proto(app: Coordinator) -> service_pb2.RunInfo:
    config, setup = app.config, app.setup
    return service_pb2.RunInfo(
        run_id=config.run.run_id,
        task=config.run.task,
        model_name=setup.model_name,
        vocab_size=setup.vocab_size,
        eos_token_id=setup.eos_token_id,
        trainer_public_key=setup.trainer_public_key,
        trainer_key_fingerprint=key_id(setup.trainer_public_key),
        latest_policy_version=app.latest_policy_version(),
        max_staleness=config.run.max_staleness,
        group_size=config.run.group_size,
        sampling=convert.sampling_to_proto(app.scheduler.plan.sampling),
        run_seed=config.run.seed,
        p2p_bootstrap=list(app.p2p_bootstrap),
    )


def node_status_proto(app: Coordinator, node: NodeRecord) -> service_pb2.NodeStatus:
    return service_pb2.NodeStatus(
        node_id=node.node_id,
        display_name=node.display_name,
        engine=node.engine,
        hardware=node.hardware,
        software_version=node.software_version,
        state=int(app.node_state(node)),
        last_seen_ms=node.last_seen_ms,
        policy_version=node.policy_version,
        num_accepted=node.num_rollouts_accepted,
        num_rejected=node.num_rollouts_rejected,
        reputation=node.reputation,
    )


class Ranks:
    """The leaderboard's ranks, recomputed at most every RANK_REFRESH_S: every node asks for its
    standing each minute, and a ranking reads every node's totals."""

    def __init__(self, app: Coordinator):
        self.app = app
        self._lock = threading.Lock()
        self._ranks: dict[str, int] = {}
        self._computed_s = -math.inf

    def of(self, node_id: str) -> tuple[int, int]:
        """The node's rank (0: unranked) and the number of nodes ranked."""
        with self._lock:
            if time.monotonic() - self._computed_s >= RANK_REFRESH_S:
                self._ranks = {row.node_id: row.rank for row in DashboardData(self.app).leaderboard()}
                self._computed_s = time.monotonic()
            return self._ranks.get(node_id, 0), len(self._ranks)


def node_standing_proto(app: Coordinator, node_id: str, ranks: Ranks) -> service_pb2.NodeStanding:
    node = app.store.get_node(node_id)
    if node is None:
        raise UnknownNodeError(f"node {node_id} is not registered")
    totals = next(iter(app.store.contribution_totals(node_id)), None)
    oldest_pending_ms = app.store.oldest_pending_ms(node_id)
    last = next(iter(app.store.list_rejections(node_id, 1)), None)
    rank, num_nodes = ranks.of(node_id)
    return service_pb2.NodeStanding(
        rank=rank,
        num_nodes=num_nodes,
        reputation=node.reputation,
        num_strikes=node.num_strikes,
        on_probation=node.on_probation,
        ban_reason=node.ban_reason,
        settled_tokens=totals.settled.num_tokens if totals else 0,
        pending_tokens=totals.pending.num_tokens if totals else 0,
        voided_tokens=totals.voided.num_tokens if totals else 0,
        pending_settles_ms=0 if oldest_pending_ms is None else oldest_pending_ms + SETTLE_WINDOW_MS,
        last_rejection_reason=last.reason if last else "",
        last_rejection_message=last.message if last else "",
        last_rejection_remedy=remedy(last.reason) if last else "",
        dashboard_url=f"{app.dashboard_url}/nodes/{node_id}" if app.dashboard_url else "",
    )


class NodeServicer(service_pb2_grpc.NodeServiceServicer):
    def __init__(self, app: Coordinator, gate: Gate):
        self.app = app
        self.gate = gate
        self.ranks = Ranks(app)

    def _method(self, name: str) -> str:
        return method_name("NodeService", name)

    @_guarded
    async def GetRunInfo(self, request, context):
        self.gate.unauthenticated(_peer(context))
        return await asyncio.to_thread(run_info_proto, self.app)

    @_guarded
    async def Register(self, envelope, context):
        caller = await asyncio.to_thread(
            self.gate.node_caller, envelope, self._method("Register"), _peer(context), registering=True
        )
        request = self.gate.decode(caller.envelope.payload, service_pb2.RegisterRequest)
        node = await asyncio.to_thread(
            self.app.register,
            caller.envelope.signer_id,
            caller.envelope.signer_public_key,
            request.display_name,
            request.engine,
            request.hardware,
            request.software_version,
        )
        log.info("node %s registered (%s, %s)", node.node_id, node.engine, node.hardware)
        return service_pb2.RegisterResponse(
            node_id=node.node_id,
            state=int(self.app.node_state(node)),
            heartbeat_interval_ms=round(self.app.config.heartbeat_interval_s * 1000),
            run_info=await asyncio.to_thread(run_info_proto, self.app),
        )

    @_guarded
    async def Heartbeat(self, envelope, context):
        caller = await asyncio.to_thread(self.gate.node_caller, envelope, self._method("Heartbeat"), _peer(context))
        request = self.gate.decode(caller.envelope.payload, service_pb2.HeartbeatRequest)
        self.app.heartbeat(caller.envelope.signer_id, request.policy_version, request.tokens_per_second)
        return service_pb2.HeartbeatResponse(
            latest_policy_version=self.app.latest_policy_version(),
            server_time_ms=self.app.clock(),
            state=int(NodeState.ONLINE),
        )

    @_guarded
    async def GetManifest(self, request, context):
        self.gate.unauthenticated(_peer(context))
        signed = await asyncio.to_thread(self.app.policy.manifest, request.version or None)
        return convert.signed_manifest_to_proto(signed)

    @_guarded
    async def GetUpdatePath(self, request, context):
        self.gate.unauthenticated(_peer(context))
        path = await asyncio.to_thread(self.app.policy.update_path, request.from_version or None)
        return service_pb2.UpdatePath(manifests=[convert.signed_manifest_to_proto(m) for m in path])

    @_guarded_stream
    async def FetchBlob(self, request, context):
        self.gate.unauthenticated(_peer(context))
        chunks = await asyncio.to_thread(self.app.policy.blobs.iter_blob_chunks, request.hash, request.offset)
        offset = request.offset
        while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
            yield service_pb2.BlobChunk(offset=offset, data=chunk)
            offset += len(chunk)

    @_guarded
    async def LeaseWork(self, envelope, context):
        return await asyncio.to_thread(self._lease_work, envelope, _peer(context))

    def _lease_work(self, envelope, peer: str) -> service_pb2.LeaseResponse:
        caller = self.gate.node_caller(envelope, self._method("LeaseWork"), peer)
        request = self.gate.decode(caller.envelope.payload, service_pb2.LeaseRequest)
        lease = self.app.lease(caller.envelope.signer_id, request.policy_version)
        if isinstance(lease, LeaseWait):
            return service_pb2.LeaseResponse(retry_after_ms=lease.retry_after_ms, wait_reason=lease.reason)
        return service_pb2.LeaseResponse(lease=convert.lease_to_proto(lease))

    @_guarded
    async def SubmitRollouts(self, envelope, context):
        return await asyncio.to_thread(self._submit_rollouts, envelope, _peer(context))

    def _submit_rollouts(self, envelope, peer: str) -> rollout_pb2.Receipt:
        caller = self.gate.node_caller(envelope, self._method("SubmitRollouts"), peer)
        result = self.app.submit(caller.envelope.signer_id, caller.envelope.payload)
        return rollout_pb2.Receipt.FromString(result.receipt_bytes)

    @_guarded
    async def ReleaseLease(self, envelope, context):
        caller = await asyncio.to_thread(self.gate.node_caller, envelope, self._method("ReleaseLease"), _peer(context))
        request = self.gate.decode(caller.envelope.payload, service_pb2.ReleaseLeaseRequest)
        await asyncio.to_thread(self.app.release, caller.envelope.signer_id, request.lease_id)
        return service_pb2.ReleaseLeaseResponse()

    @_guarded
    async def GetNodeStanding(self, envelope, context):
        caller = await asyncio.to_thread(
            self.gate.node_caller, envelope, self._method("GetNodeStanding"), _peer(context)
        )
        self.gate.decode(caller.envelope.payload, service_pb2.NodeStandingRequest)
        return await asyncio.to_thread(node_standing_proto, self.app, caller.envelope.signer_id, self.ranks)


class TrainerServicer(service_pb2_grpc.TrainerServiceServicer):
    def __init__(self, app: Coordinator, gate: Gate):
        self.app = app
        self.gate = gate

    def _method(self, name: str) -> str:
        return method_name("TrainerService", name)

    async def UploadBlob(self, request_iterator, context):
        header = None
        received = bytearray()
        try:
            async for part in request_iterator:
                if header is None:
                    if not part.HasField("header"):
                        raise InvalidRequestError("an upload starts with a signed header")
                    header = self.gate.trainer_request(
                        part.header, self._method("UploadBlob"), service_pb2.BlobUploadHeader, _peer(context)
                    )
                    if header.size > MAX_BLOB_BYTES:
                        raise InvalidRequestError(f"blob of {header.size} bytes exceeds the {MAX_BLOB_BYTES}-byte cap")
                    continue
                received.extend(part.data)
                if len(received) > header.size:
                    raise InvalidRequestError(f"upload is longer than its declared {header.size} bytes")
            if header is None or len(received) != header.size:
                raise InvalidRequestError("upload ended before its declared size")
            stored = await asyncio.to_thread(self.app.policy.blobs.put_blob, header.hash, bytes(received))
        except GateError as error:
            await context.abort(error.status, str(error))
        except (InvalidRequestError, BlobStoreError) as error:
            status, message = grpc.StatusCode.INVALID_ARGUMENT, str(error)
            if header is None:  # refused before any signature was checked: charged to the peer's host
                try:
                    self.gate.unauthenticated(_peer(context))
                except GateError as limited:
                    status, message = limited.status, str(limited)
            await context.abort(status, message)
        return service_pb2.BlobUploadResponse(hash=header.hash, already_present=not stored)

    @_guarded
    async def PublishPolicy(self, envelope, context):
        request = self.gate.trainer_request(
            envelope, self._method("PublishPolicy"), service_pb2.PublishRequest, _peer(context)
        )
        try:
            manifest = await asyncio.to_thread(
                self.app.policy.publish, convert.signed_manifest_from_proto(request.manifest)
            )
        except (PolicyUpdateError, BlobStoreError) as error:
            raise InvalidRequestError(f"publish refused: {error}") from None
        log.info("published policy version %d (%s)", manifest.version, manifest.codec.name.lower())
        return service_pb2.PublishResponse(version=manifest.version)

    @_guarded
    async def Resume(self, envelope, context):
        request = self.gate.trainer_request(envelope, self._method("Resume"), service_pb2.ResumeRequest, _peer(context))
        num_restored = await asyncio.to_thread(self.app.resume_trainer, request.trainer_step)
        return service_pb2.ResumeResponse(
            num_groups_restored=num_restored, latest_policy_version=self.app.latest_policy_version()
        )

    @_guarded_stream
    async def StreamGroups(self, envelope, context):
        request = self.gate.trainer_request(
            envelope, self._method("StreamGroups"), service_pb2.StreamGroupsRequest, _peer(context)
        )
        groups, _ = await asyncio.to_thread(
            self.app.ready_groups, max(1, min(request.max_groups, 4096)), request.max_staleness
        )
        for group in groups:
            yield convert.ready_group_to_proto(group)

    @_guarded
    async def AckGroups(self, envelope, context):
        request = self.gate.trainer_request(envelope, self._method("AckGroups"), service_pb2.AckRequest, _peer(context))
        outcome, num_stale = await asyncio.to_thread(
            self.app.ack, request.consumed_group_ids, request.stale_group_ids, request.trainer_step
        )
        return service_pb2.AckResponse(num_consumed=len(outcome.consumed), num_stale=num_stale)

    @_guarded
    async def ReportMetrics(self, envelope, context):
        request = self.gate.trainer_request(
            envelope, self._method("ReportMetrics"), service_pb2.TrainerMetrics, _peer(context)
        )
        try:
            metrics = json.loads(request.metrics_json)
        except json.JSONDecodeError as error:
            raise InvalidRequestError(f"metrics_json is not JSON: {error}") from None
        if not isinstance(metrics, dict):
            raise InvalidRequestError("metrics_json must be a JSON object")
        await asyncio.to_thread(self.app.store.add_metrics, request.step, request.metrics_json, self.app.clock())
        return service_pb2.TrainerMetricsResponse()


class AdminServicer(service_pb2_grpc.AdminServiceServicer):
    def __init__(self, app: Coordinator, gate: Gate):
        self.app = app
        self.gate = gate

    @_guarded
    async def ListNodes(self, request, context):
        require_private_transport(context)
        self.gate.operator(context.invocation_metadata(), _peer(context))
        nodes = await asyncio.to_thread(self.app.store.list_nodes)
        return service_pb2.NodeList(nodes=[node_status_proto(self.app, n) for n in nodes])

    @_guarded
    async def BanNode(self, request, context):
        require_private_transport(context)
        self.gate.operator(context.invocation_metadata(), _peer(context))
        node = await asyncio.to_thread(
            self.app.store.ban_node, request.node_id, request.reason or "banned by the operator"
        )
        self.gate.forget(request.node_id)
        log.warning("operator banned %s: %s", node.node_id, node.ban_reason)
        return service_pb2.BanResponse(node=node_status_proto(self.app, node))

    @_guarded
    async def UnbanNode(self, request, context):
        require_private_transport(context)
        self.gate.operator(context.invocation_metadata(), _peer(context))
        node = await asyncio.to_thread(self.app.store.unban_node, request.node_id)
        self.gate.forget(request.node_id)
        log.warning("operator unbanned %s", node.node_id)
        return service_pb2.BanResponse(node=node_status_proto(self.app, node))

    @_guarded
    async def GetRunStatus(self, request, context):
        require_private_transport(context)
        self.gate.operator(context.invocation_metadata(), _peer(context))
        counters = await asyncio.to_thread(self.app.run_counters)
        return service_pb2.RunStatus(
            run_info=await asyncio.to_thread(run_info_proto, self.app),
            trainer_step=counters.trainer_step,
            num_nodes_online=counters.num_nodes_online,
            num_rollouts_accepted=counters.num_rollouts_accepted,
            num_rollouts_rejected=counters.num_rollouts_rejected,
            num_groups_ready=counters.num_groups.get(GroupState.READY, 0),
            num_groups_consumed=counters.num_groups.get(GroupState.CONSUMED, 0),
            num_groups_stale=counters.num_groups.get(GroupState.STALE, 0),
        )

    @_guarded
    async def ListVersions(self, request, context):
        require_private_transport(context)
        self.gate.operator(context.invocation_metadata(), _peer(context))
        versions, holders = await asyncio.to_thread(self.app.versions_with_holders)
        return service_pb2.VersionList(
            versions=[
                service_pb2.VersionInfo(
                    version=v.version,
                    base_version=v.base_version,
                    codec=int(v.codec),
                    num_bytes=v.num_bytes,
                    full_state_bytes=v.full_state_bytes,
                    created_at_ms=v.created_ms,
                    num_nodes_holding=holders.get(v.version, 0),
                )
                for v in versions
            ]
        )
