"""The gate under hostile input (issue 17): signatures are verified before a signer's allowance
is charged, failures and unsigned calls are charged to the peer's host, registration of new keys
is limited per host, every decoded request is bounded, and bad input gets a clean status
(items 1, 5, 6, 8 and 9)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from dataclasses import dataclass

import grpc
import pytest

from coordinator.blob_http import RangeNotSatisfiableError, parse_range
from coordinator.config import ServerSection
from coordinator.core import InvalidRequestError
from coordinator.gate import Gate, GateError, GateLimits, RefusalCounts, peer_host
from coordinator.grpc_servicers import GuardInterceptor, TrainerServicer
from coordinator.rpc_metrics import rpc_latency_histogram
from coordinator.store.submissions import (
    MAX_STORED_EVIDENCE_CHARS,
    MAX_STORED_MESSAGE_CHARS,
    MAX_STORED_REJECTIONS_PER_SUBMISSION,
)
from protocol import convert
from protocol.envelope import EnvelopeVerifier, method_name, seal
from protocol.identity import Identity
from protocol.proto import rollout_pb2, service_pb2, service_pb2_grpc
from protocol.types import FinishReason, RejectReason
from tests.unit.conftest import T0
from tests.unit.test_ratelimit import FakeClock
from tests.unit.test_store_contract import (  # noqa: F401  (store, store_url: fixtures, SQLite and PostgreSQL)
    _leased_submission,
    _register,
    store,
    store_url,
)

ATTACKER = "203.0.113.9"
TRAINER_HOST = "198.51.100.2"
HEARTBEAT = method_name("NodeService", "Heartbeat")
ACK = method_name("TrainerService", "AckGroups")


def limits(clock: FakeClock, num_replicas: int = 1, **server) -> GateLimits:
    return GateLimits.from_config(ServerSection(**server), num_replicas, clock=clock)


@dataclass(frozen=True)
class KnownNode:
    """What the gate reads of a registered node."""

    node_id: str
    banned: bool = False
    ban_reason: str = ""


class Registry:
    """The gate's view of registered nodes, as a dict."""

    def __init__(self):
        self.nodes: dict[str, KnownNode] = {}

    def find(self, node_id: str) -> KnownNode | None:
        return self.nodes.get(node_id)

    def add(self, identity: Identity) -> None:
        self.nodes[identity.key_id] = KnownNode(identity.key_id)


def make_gate(trainer: Identity, registry: Registry, num_replicas: int = 1, **server) -> Gate:
    return Gate(
        EnvelopeVerifier(), limits(FakeClock(), num_replicas, **server), registry.find, trainer.public_key, "token"
    )


def forged(identity: Identity, method: str, payload: bytes):
    """An envelope naming `identity`'s key whose signature does not verify."""
    envelope = seal(identity, method, payload)
    envelope.signature = bytes([envelope.signature[0] ^ 1]) + envelope.signature[1:]
    return envelope


def refusal(call) -> grpc.StatusCode:
    with pytest.raises(GateError) as refused:
        call()
    return refused.value.status


def test_a_forged_flood_under_the_trainer_key_spends_only_the_attackers_address():
    trainer = Identity.generate()
    gate = make_gate(trainer, Registry(), request_burst_trainer=10, unauthenticated_request_burst_per_address=5)
    payload = service_pb2.AckRequest(trainer_step=1).SerializeToString()
    codes = [
        refusal(lambda: gate.trainer_request(forged(trainer, ACK, payload), ACK, service_pb2.AckRequest, ATTACKER))
        for _ in range(200)
    ]
    assert set(codes[:5]) == {grpc.StatusCode.UNAUTHENTICATED}
    assert set(codes[5:]) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    for host in (TRAINER_HOST, ATTACKER):  # the real trainer is served, even from the attacker's own host
        request = gate.trainer_request(seal(trainer, ACK, payload), ACK, service_pb2.AckRequest, host)
        assert request.trainer_step == 1


def test_the_trainer_has_its_own_larger_allowance():
    trainer, node = Identity.generate(), Identity.generate()
    registry = Registry()
    registry.add(node)
    gate = make_gate(trainer, registry, request_burst_per_node=3, request_burst_trainer=30)
    payload = service_pb2.HeartbeatRequest(policy_version=1).SerializeToString()
    for _ in range(3):
        gate.node_caller(seal(node, HEARTBEAT, payload), HEARTBEAT, TRAINER_HOST)
    assert refusal(lambda: gate.node_caller(seal(node, HEARTBEAT, payload), HEARTBEAT, TRAINER_HOST)) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    ack = service_pb2.AckRequest().SerializeToString()
    for _ in range(30):
        gate.trainer_request(seal(trainer, ACK, ack), ACK, service_pb2.AckRequest, TRAINER_HOST)


def test_a_forged_flood_under_a_node_key_does_not_drain_the_node():
    node = Identity.generate()
    registry = Registry()
    registry.add(node)
    gate = make_gate(Identity.generate(), registry, request_burst_per_node=3)
    payload = service_pb2.HeartbeatRequest(policy_version=1).SerializeToString()
    for _ in range(50):
        refusal(lambda: gate.node_caller(forged(node, HEARTBEAT, payload), HEARTBEAT, ATTACKER))
    assert gate.node_caller(seal(node, HEARTBEAT, payload), HEARTBEAT, ATTACKER).node.node_id == node.key_id


def test_fresh_keys_are_charged_to_their_address():
    gate = make_gate(Identity.generate(), Registry(), unauthenticated_request_burst_per_address=4)
    payload = service_pb2.HeartbeatRequest().SerializeToString()
    codes = [
        refusal(lambda: gate.node_caller(seal(Identity.generate(), HEARTBEAT, payload), HEARTBEAT, ATTACKER))
        for _ in range(6)
    ]
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 4 + [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2


def test_replicas_behind_one_address_each_allow_their_share_of_a_node_s_allowance():
    node, trainer = Identity.generate(), Identity.generate()
    registry = Registry()
    registry.add(node)
    replicas = [
        make_gate(trainer, registry, 2, request_burst_per_node=10, registration_burst_per_address=3) for _ in range(2)
    ]
    payload = service_pb2.HeartbeatRequest(policy_version=1).SerializeToString()
    served = 0
    for index in range(40):  # spread over both replicas, as N connections of one node would be
        try:
            replicas[index % 2].node_caller(seal(node, HEARTBEAT, payload), HEARTBEAT, ATTACKER)
            served += 1
        except GateError as refused:
            assert refused.status == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert served == 10, "one burst in all, not one per replica"
    shares = [getattr(replicas[0].limits, field.name) for field in dataclasses.fields(GateLimits)]
    assert [(limiter.rate, limiter.burst) for limiter in shares] == [(25.0, 5), (500.0, 1000), (100.0, 500), (0.25, 2)]
    with pytest.raises(ValueError, match="num_replicas must be at least 1"):
        limits(FakeClock(), 0)


def test_registration_of_new_keys_is_limited_per_address():
    registry = Registry()
    gate = make_gate(Identity.generate(), registry, registration_burst_per_address=3)
    register = method_name("NodeService", "Register")
    payload = service_pb2.RegisterRequest(display_name="n").SerializeToString()
    identities = [Identity.generate() for _ in range(4)]
    for identity in identities[:3]:
        gate.node_caller(seal(identity, register, payload), register, ATTACKER, registering=True)
        registry.add(identity)
    assert (
        refusal(lambda: gate.node_caller(seal(identities[3], register, payload), register, ATTACKER, registering=True))
        == grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    gate.node_caller(seal(identities[3], register, payload), register, TRAINER_HOST, registering=True)
    # A known node registering again (a restart) is not a new key.
    gate.node_caller(seal(identities[0], register, payload), register, ATTACKER, registering=True)


@pytest.mark.parametrize(
    ("peer", "host"),
    [
        ("ipv4:10.0.0.7:5123", "10.0.0.7"),
        ("ipv6:[::1]:5123", "::1"),
        ("ipv6:%5B::1%5D:5123", "::1"),
        ("unix:/tmp/socket", "unix:/tmp/socket"),
    ],
)
def test_peer_host(peer, host):
    assert peer_host(peer) == host


def test_out_of_range_integers_are_refused_naming_the_field():
    payload = service_pb2.HeartbeatRequest(policy_version=2**64 - 1).SerializeToString()
    with pytest.raises(GateError) as refused:
        Gate.decode(payload, service_pb2.HeartbeatRequest)
    assert refused.value.status == grpc.StatusCode.INVALID_ARGUMENT
    assert "HeartbeatRequest.policy_version" in str(refused.value)
    assert (
        Gate.decode(
            service_pb2.HeartbeatRequest(policy_version=2**63 - 1).SerializeToString(), service_pb2.HeartbeatRequest
        ).policy_version
        == 2**63 - 1
    )


def test_repeated_fields_are_bounded():
    too_many = service_pb2.AckRequest(consumed_group_ids=["g"] * (convert.MAX_REPEATED_ELEMENTS + 1))
    with pytest.raises(convert.WireFormatError, match="consumed_group_ids"):
        convert.check_bounds(too_many)
    nested = rollout_pb2.RolloutBatch(groups=[rollout_pb2.RolloutGroup(), rollout_pb2.RolloutGroup(prompt_index=2**63)])
    with pytest.raises(convert.WireFormatError, match=r"groups\[1\]\.prompt_index"):
        convert.check_bounds(nested)


def test_one_bad_heartbeat_does_not_stop_the_others(coordinator):
    nodes = [Identity.generate() for _ in range(3)]
    for node in nodes:
        coordinator.register(node.key_id, node.public_key, "n", "torch", "cpu", "0")
    coordinator.clock.now_ms = T0 + 5_000
    coordinator.heartbeat(nodes[0].key_id, 3, 1.0)
    coordinator.heartbeat(nodes[1].key_id, 2**64 - 1, 1.0)  # only the gate keeps this out
    coordinator.heartbeat(nodes[2].key_id, 4, 1.0)
    assert coordinator.flush_heartbeats() == 3
    seen = {n.node_id: (n.last_seen_ms, n.policy_version) for n in coordinator.store.list_nodes()}
    assert seen[nodes[0].key_id] == (T0 + 5_000, 3) and seen[nodes[2].key_id] == (T0 + 5_000, 4)
    assert seen[nodes[1].key_id][0] == T0


def _registered(coordinator) -> str:
    node = Identity.generate()
    coordinator.register(node.key_id, node.public_key, "n", "torch", "cpu", "0")
    return node.key_id


def test_a_huge_batch_is_refused_before_any_per_rollout_work(coordinator):
    node_id = _registered(coordinator)
    batch = rollout_pb2.RolloutBatch(
        lease_id="no-such-lease", groups=[rollout_pb2.RolloutGroup(rollouts=[rollout_pb2.Rollout()] * 100_000)]
    )
    # The count check names the lease's group size: it ran before the rollouts were converted or checked.
    with pytest.raises(InvalidRequestError, match=r"groups\[0\]\.rollouts: 100000 rollouts, the lease's group size"):
        coordinator.submit(node_id, batch.SerializeToString())
    assert coordinator.store.list_submissions(node_id, 10) == []


def test_an_oversize_prompt_index_is_refused_naming_the_field(coordinator):
    node_id = _registered(coordinator)
    batch = rollout_pb2.RolloutBatch(lease_id="x", groups=[rollout_pb2.RolloutGroup(prompt_index=2**63)])
    with pytest.raises(InvalidRequestError, match=r"groups\[0\]\.prompt_index"):
        coordinator.submit(node_id, batch.SerializeToString())


def test_a_refused_batch_stores_its_message_once(coordinator):
    node_id = _registered(coordinator)
    lease_id = "x" * 64
    rollouts = [rollout_pb2.Rollout(sample_index=s, finish_reason=int(FinishReason.LENGTH)) for s in range(8)]
    batch = rollout_pb2.RolloutBatch(
        lease_id=lease_id, groups=[rollout_pb2.RolloutGroup(prompt_index=p, rollouts=rollouts) for p in range(4)]
    )
    result = coordinator.submit(node_id, batch.SerializeToString())
    assert len(result.receipt.verdicts) == 32 and not any(v.accepted for v in result.receipt.verdicts)
    assert {v.reason for v in result.receipt.verdicts} == {RejectReason.UNKNOWN_LEASE}
    assert [bool(v.message) for v in result.receipt.verdicts] == [True] + [False] * 31
    rejections = coordinator.store.list_rejections(node_id, 100)
    assert len(rejections) == MAX_STORED_REJECTIONS_PER_SUBMISSION
    assert sum(lease_id in r.message for r in rejections) == 1
    assert coordinator.store.get_node(node_id).num_rollouts_rejected == 32


def test_stored_rejections_are_capped_in_number_message_and_evidence(store):  # noqa: F811 (the imported fixture)
    _register(store)
    _, submission = _leased_submission(store, "node-a", b"huge-evidence", num_rejected=10)
    long_evidence = json.dumps({"positions": list(range(20_000))})
    submission = dataclasses.replace(
        submission,
        verdicts=tuple(
            dataclasses.replace(verdict, message="m" * 100_000, evidence_json=long_evidence)
            if not verdict.accepted
            else verdict
            for verdict in submission.verdicts
        ),
    )
    store.record_submission(submission)
    rejections = store.list_rejections("node-a", 100)
    assert len(rejections) == MAX_STORED_REJECTIONS_PER_SUBMISSION
    assert all(len(r.message) == MAX_STORED_MESSAGE_CHARS for r in rejections)
    assert [json.loads(r.evidence_json) for r in rejections] == [
        {"truncated": True, "num_chars": len(long_evidence)}
    ] * MAX_STORED_REJECTIONS_PER_SUBMISSION
    assert len(long_evidence) > MAX_STORED_EVIDENCE_CHARS


def test_a_range_of_thousands_of_digits_is_not_satisfiable():
    with pytest.raises(RangeNotSatisfiableError):
        parse_range("bytes=" + "9" * 4300 + "-", 100)
    assert parse_range("bytes=0-" + "9" * 4300, 100) == (0, 100)
    assert parse_range("bytes=-" + "9" * 4300, 100) == (0, 100)
    assert parse_range("bytes=" + "0" * 4300 + "1-5", 100) == (1, 6)


class Exploding(service_pb2_grpc.NodeServiceServicer):
    """A servicer whose handlers fail in ways nobody expected."""

    async def GetRunInfo(self, request, context):
        raise RuntimeError("a bug")

    async def FetchBlob(self, request, context):
        yield service_pb2.BlobChunk(offset=0, data=b"x")
        raise KeyError("another bug")


def test_malformed_requests_and_unexpected_errors_are_one_line_and_counted(caplog):
    refusals = RefusalCounts()
    latency = rpc_latency_histogram()
    gate = make_gate(Identity.generate(), Registry())

    async def scenario():
        server = grpc.aio.server(interceptors=[GuardInterceptor(gate, refusals, latency)])
        service_pb2_grpc.add_NodeServiceServicer_to_server(Exploding(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        codes = {}
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                for label, path, request in (
                    ("malformed", "GetRunInfo", b"\xff\xff\xff"),
                    (
                        "out of bounds",
                        "GetManifest",
                        service_pb2.ManifestRequest(version=2**64 - 1).SerializeToString(),
                    ),
                    ("bug", "GetRunInfo", b""),
                    ("streamed bug", "FetchBlob", b""),
                ):
                    method = method_name("NodeService", path)
                    try:
                        if path == "FetchBlob":
                            async for _ in channel.unary_stream(method)(request, timeout=30):
                                pass
                        else:
                            await channel.unary_unary(method)(request, timeout=30)
                        codes[label] = grpc.StatusCode.OK
                    except grpc.aio.AioRpcError as error:
                        codes[label] = error.code()
        finally:
            await server.stop(None)
        return codes

    with caplog.at_level(logging.WARNING):
        codes = asyncio.run(scenario())
    assert codes == {
        "malformed": grpc.StatusCode.INVALID_ARGUMENT,
        "out of bounds": grpc.StatusCode.INVALID_ARGUMENT,
        "bug": grpc.StatusCode.INTERNAL,
        "streamed bug": grpc.StatusCode.INTERNAL,
    }
    node_service = "/rollproof.v1.NodeService/"
    assert refusals.snapshot() == {
        (node_service + "GetRunInfo", "malformed"): 1,
        (node_service + "GetManifest", "malformed"): 1,
        (node_service + "GetRunInfo", "internal"): 1,
        (node_service + "FetchBlob", "internal"): 1,
    }
    timed = {
        (sample.labels["method"], sample.labels["code"]): sample.value
        for metric in latency.collect()
        for sample in metric.samples
        if sample.name.endswith("_count")
    }
    # what reached a handler is timed; a request that does not decode never does
    assert timed == {(node_service + "GetRunInfo", "INTERNAL"): 1, (node_service + "FetchBlob", "INTERNAL"): 1}
    assert not any(record.exc_info for record in caplog.records)
    assert "version: 18446744073709551615" in caplog.text and "RuntimeError: a bug" in caplog.text


def test_the_batched_heartbeat_write_drops_only_the_row_out_of_range(store):  # noqa: F811 (the imported fixture)
    for node_id in ("node-a", "node-b", "node-c"):
        store.register_node(node_id, bytes(32), node_id, "torch", "cpu", "0", T0)
    store.record_heartbeats(
        [("node-a", 3, 1.0, T0 + 5), ("node-b", 2**64 - 1, 1.0, T0 + 5), ("node-c", 4, 1.0, T0 + 5)]
    )
    seen = {n.node_id: (n.last_seen_ms, n.policy_version) for n in store.list_nodes()}
    assert seen == {"node-a": (T0 + 5, 3), "node-b": (T0, 0), "node-c": (T0 + 5, 4)}


def test_housekeeping_settles_credit_when_heartbeats_fail(coordinator):
    """Each housekeeping step runs on its own: a heartbeat write that always fails (here: made to)
    holds up neither lease expiry nor settlement."""
    from coordinator.server import _housekeeping

    def failing_flush() -> int:
        raise OverflowError("Python int too large to convert to SQLite INTEGER")

    async def scenario():
        loop, settled = asyncio.get_running_loop(), asyncio.Event()
        settle = coordinator.store.settle_contributions

        def settle_and_tell(before_ms: int) -> int:
            num_settled = settle(before_ms)
            loop.call_soon_threadsafe(settled.set)
            return num_settled

        coordinator.flush_heartbeats = failing_flush
        coordinator.store.settle_contributions = settle_and_tell
        housekeeping = asyncio.create_task(_housekeeping(coordinator.config, coordinator))
        try:
            await asyncio.wait_for(settled.wait(), timeout=60)
        finally:
            housekeeping.cancel()

    asyncio.run(scenario())


def test_uploads_without_a_signed_header_are_charged_to_their_address():
    gate = make_gate(Identity.generate(), Registry(), unauthenticated_request_burst_per_address=3)

    async def scenario() -> list[grpc.StatusCode]:
        server = grpc.aio.server(interceptors=[GuardInterceptor(gate, RefusalCounts(), rpc_latency_histogram())])
        service_pb2_grpc.add_TrainerServiceServicer_to_server(TrainerServicer(app=None, gate=gate), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        codes = []
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                upload = channel.stream_unary(method_name("TrainerService", "UploadBlob"))
                for parts in ([service_pb2.BlobUpload(data=b"x").SerializeToString()], [b"\xff\xff"]) * 3:
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await upload(iter(parts), timeout=30)
                    codes.append(refused.value.code())
        finally:
            await server.stop(None)
        return codes

    assert asyncio.run(scenario()) == [grpc.StatusCode.INVALID_ARGUMENT] * 3 + [grpc.StatusCode.RESOURCE_EXHAUSTED] * 3
