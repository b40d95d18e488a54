"""Thin gRPC servicers: verify through the Gate, convert, call the Coordinator in a worker
thread, convert back. No decisions are made here. The node's hot calls (lease, submit) make
one trip to the thread pool for all of it."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Callable

import grpc

from coordinator.app import Coordinator, InvalidRequestError, LeaseWait
from coordinator.blobstore import BlobStoreError, NoUpdatePathError, UnknownBlobError
from coordinator.gate import Gate, GateError
from coordinator.store import GroupState, LeaseCapError, NodeRecord, UnknownNodeError
from protocol import convert
from protocol.envelope import method_name
from protocol.identity import key_id
from protocol.manifest import MAX_BLOB_BYTES, PolicyUpdateError
from protocol.proto import rollout_pb2, service_pb2, service_pb2_grpc
from protocol.types import NodeState

log = logging.getLogger(__name__)


def _guarded(handler: Callable) -> Callable:
    """Map the errors a request can cause to status codes with their messages."""

    @functools.wraps(handler)
    async def wrapper(self, request, context):
        try:
            return await handler(self, request, context)
        except GateError as error:
            await context.abort(error.status, str(error))
        except (InvalidRequestError, UnknownNodeError) as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except LeaseCapError as error:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
        except NoUpdatePathError as error:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(error))
        except BlobStoreError as error:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(error))

    return wrapper


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


class NodeServicer(service_pb2_grpc.NodeServiceServicer):
    def __init__(self, app: Coordinator, gate: Gate):
        self.app = app
        self.gate = gate

    def _method(self, name: str) -> str:
        return method_name("NodeService", name)

    async def GetRunInfo(self, request, context):
        return await asyncio.to_thread(run_info_proto, self.app)

    @_guarded
    async def Register(self, envelope, context):
        caller = await asyncio.to_thread(self.gate.node_caller, envelope, self._method("Register"), registering=True)
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
        caller = await asyncio.to_thread(self.gate.node_caller, envelope, self._method("Heartbeat"))
        request = self.gate.decode(caller.envelope.payload, service_pb2.HeartbeatRequest)
        self.app.heartbeat(caller.envelope.signer_id, request.policy_version, request.tokens_per_second)
        return service_pb2.HeartbeatResponse(
            latest_policy_version=self.app.latest_policy_version(),
            server_time_ms=self.app.clock(),
            state=int(NodeState.ONLINE),
        )

    @_guarded
    async def GetManifest(self, request, context):
        signed = await asyncio.to_thread(self.app.policy.manifest, request.version or None)
        return convert.signed_manifest_to_proto(signed)

    @_guarded
    async def GetUpdatePath(self, request, context):
        path = await asyncio.to_thread(self.app.policy.update_path, request.from_version or None)
        return service_pb2.UpdatePath(manifests=[convert.signed_manifest_to_proto(m) for m in path])

    async def FetchBlob(self, request, context):
        try:
            chunks = await asyncio.to_thread(self.app.policy.blobs.iter_blob_chunks, request.hash, request.offset)
        except UnknownBlobError as error:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(error))
        except BlobStoreError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        offset = request.offset
        while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
            yield service_pb2.BlobChunk(offset=offset, data=chunk)
            offset += len(chunk)

    @_guarded
    async def LeaseWork(self, envelope, context):
        return await asyncio.to_thread(self._lease_work, envelope)

    def _lease_work(self, envelope) -> service_pb2.LeaseResponse:
        caller = self.gate.node_caller(envelope, self._method("LeaseWork"))
        request = self.gate.decode(caller.envelope.payload, service_pb2.LeaseRequest)
        lease = self.app.lease(caller.envelope.signer_id, request.policy_version)
        if isinstance(lease, LeaseWait):
            return service_pb2.LeaseResponse(retry_after_ms=lease.retry_after_ms, wait_reason=lease.reason)
        return service_pb2.LeaseResponse(lease=convert.lease_to_proto(lease))

    @_guarded
    async def SubmitRollouts(self, envelope, context):
        return await asyncio.to_thread(self._submit_rollouts, envelope)

    def _submit_rollouts(self, envelope) -> rollout_pb2.Receipt:
        caller = self.gate.node_caller(envelope, self._method("SubmitRollouts"))
        result = self.app.submit(caller.envelope.signer_id, caller.envelope.payload)
        return rollout_pb2.Receipt.FromString(result.receipt_bytes)

    @_guarded
    async def ReleaseLease(self, envelope, context):
        caller = await asyncio.to_thread(self.gate.node_caller, envelope, self._method("ReleaseLease"))
        request = self.gate.decode(caller.envelope.payload, service_pb2.ReleaseLeaseRequest)
        await asyncio.to_thread(self.app.release, caller.envelope.signer_id, request.lease_id)
        return service_pb2.ReleaseLeaseResponse()


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
                        part.header, self._method("UploadBlob"), service_pb2.BlobUploadHeader
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
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        return service_pb2.BlobUploadResponse(hash=header.hash, already_present=not stored)

    @_guarded
    async def PublishPolicy(self, envelope, context):
        request = self.gate.trainer_request(envelope, self._method("PublishPolicy"), service_pb2.PublishRequest)
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
        request = self.gate.trainer_request(envelope, self._method("Resume"), service_pb2.ResumeRequest)
        num_restored = await asyncio.to_thread(self.app.resume_trainer, request.trainer_step)
        return service_pb2.ResumeResponse(
            num_groups_restored=num_restored, latest_policy_version=self.app.latest_policy_version()
        )

    async def StreamGroups(self, envelope, context):
        try:
            request = self.gate.trainer_request(
                envelope, self._method("StreamGroups"), service_pb2.StreamGroupsRequest
            )
        except GateError as error:
            await context.abort(error.status, str(error))
        groups, _ = await asyncio.to_thread(
            self.app.ready_groups, max(1, min(request.max_groups, 4096)), request.max_staleness
        )
        for group in groups:
            yield convert.ready_group_to_proto(group)

    @_guarded
    async def AckGroups(self, envelope, context):
        request = self.gate.trainer_request(envelope, self._method("AckGroups"), service_pb2.AckRequest)
        outcome, num_stale = await asyncio.to_thread(
            self.app.ack, request.consumed_group_ids, request.stale_group_ids, request.trainer_step
        )
        return service_pb2.AckResponse(num_consumed=len(outcome.consumed), num_stale=num_stale)

    @_guarded
    async def ReportMetrics(self, envelope, context):
        request = self.gate.trainer_request(envelope, self._method("ReportMetrics"), service_pb2.TrainerMetrics)
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
        self.gate.operator(context.invocation_metadata())
        nodes = await asyncio.to_thread(self.app.store.list_nodes)
        return service_pb2.NodeList(nodes=[node_status_proto(self.app, n) for n in nodes])

    @_guarded
    async def BanNode(self, request, context):
        self.gate.operator(context.invocation_metadata())
        node = await asyncio.to_thread(self.app.store.ban_node, request.node_id, request.reason or "banned by the operator")
        self.gate.forget(request.node_id)
        log.warning("operator banned %s: %s", node.node_id, node.ban_reason)
        return service_pb2.BanResponse(node=node_status_proto(self.app, node))

    @_guarded
    async def UnbanNode(self, request, context):
        self.gate.operator(context.invocation_metadata())
        node = await asyncio.to_thread(self.app.store.unban_node, request.node_id)
        self.gate.forget(request.node_id)
        log.warning("operator unbanned %s", node.node_id)
        return service_pb2.BanResponse(node=node_status_proto(self.app, node))

    @_guarded
    async def GetRunStatus(self, request, context):
        self.gate.operator(context.invocation_metadata())
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
        self.gate.operator(context.invocation_metadata())
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
