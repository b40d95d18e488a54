"""A fuzz of every coordinator RPC (issue 17) against a real coordinator process: random,
truncated and bit-flipped requests, and requests whose payload was mutated (oversize integers,
long strings, thousands of repeats) and validly signed again by the node, the trainer or with the
operator's token. The coordinator must answer every one with a status that names the problem —
never UNKNOWN, never a traceback in its log — keep answering honest calls, store at most 4 bytes
per byte of the requests it refuses, and keep its memory bounded."""

from __future__ import annotations

import asyncio
import math
import os
import random
import sqlite3
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from protocol import commitment, convert
from protocol.channel import open_aio_channel
from protocol.envelope import method_name, seal
from protocol.identity import Identity
from protocol.proto import policy_pb2, rollout_pb2, service_pb2, service_pb2_grpc, validation_pb2
from protocol.types import FinishReason, Rollout, RolloutBatch, RolloutGroup
from tests.integration.cluster import OPERATOR_TOKEN, Cluster

SEED = 17
NUM_REQUESTS_PER_RPC = 60
MAX_AMPLIFICATION = 4.0
MAX_RSS_GROWTH_BYTES = 128 * 1024 * 1024
MAX_MESSAGE_BYTES = 1024 * 1024
PROMPTS_PER_LEASE = 4
GROUP_SIZE = 8
MAX_TOKENS = 8
OPERATOR = (("authorization", f"Bearer {OPERATOR_TOKEN}"),)
UPLOAD_DATA = service_pb2.BlobUpload(data=bytes(64)).SerializeToString()  # follows a fuzzed upload header

UNSIGNED_64 = [0, 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1]
SIGNED_64 = [-(2**63), -1, 0, 2**63 - 1]
UNSIGNED_32 = [0, 1, 2**31, 2**32 - 1]
SIGNED_32 = [-(2**31), -1, 0, 2**31 - 1]
INTEGERS = {
    FieldDescriptor.TYPE_UINT64: UNSIGNED_64,
    FieldDescriptor.TYPE_FIXED64: UNSIGNED_64,
    FieldDescriptor.TYPE_INT64: SIGNED_64,
    FieldDescriptor.TYPE_SINT64: SIGNED_64,
    FieldDescriptor.TYPE_SFIXED64: SIGNED_64,
    FieldDescriptor.TYPE_UINT32: UNSIGNED_32,
    FieldDescriptor.TYPE_FIXED32: UNSIGNED_32,
    FieldDescriptor.TYPE_INT32: SIGNED_32,
    FieldDescriptor.TYPE_SINT32: SIGNED_32,
    FieldDescriptor.TYPE_SFIXED32: SIGNED_32,
    FieldDescriptor.TYPE_ENUM: [0, 1, 7, 2**31 - 1],
}
FLOATS = [0.0, -0.0, 1.5, -1e30, math.inf, -math.inf, math.nan]
REPEATS = [2, 100, 5000]
MAX_MUTATED_BYTES = 2 * 1024 * 1024  # repeats of a large element are cut to about this size


@dataclass(frozen=True)
class Rpc:
    service: str
    name: str
    request: Message  # for a signed RPC, the payload inside the envelope
    signer: Identity | None = None  # signs the envelope; None: the request is sent as is
    operator: bool = False  # sends the operator token
    kind: str = "unary"  # "unary", "response_stream", "request_stream"

    @property
    def path(self) -> str:
        return method_name(self.service, self.name)


def mutate(message: Message, rng: random.Random, depth: int = 0) -> None:
    """Set some fields of `message` to extreme values, in place."""
    for descriptor in message.DESCRIPTOR.fields:
        if rng.random() > 0.5:
            continue
        value = getattr(message, descriptor.name)
        try:
            if descriptor.is_repeated:
                if descriptor.type == FieldDescriptor.TYPE_MESSAGE:
                    element = value.add()
                    if depth < 3:
                        mutate(element, rng, depth + 1)
                    num_copies = min(rng.choice(REPEATS), MAX_MUTATED_BYTES // max(1, element.ByteSize()))
                    for _ in range(num_copies - 1):
                        value.add().CopyFrom(element)
                else:
                    value.extend([_extreme(descriptor, rng)] * rng.choice(REPEATS))
            elif descriptor.type == FieldDescriptor.TYPE_MESSAGE:
                if depth < 3:
                    mutate(value, rng, depth + 1)
            else:
                setattr(message, descriptor.name, _extreme(descriptor, rng))
        except (TypeError, ValueError):
            continue  # a value this field's type cannot hold at all: the wire cannot carry it either


def _extreme(descriptor: FieldDescriptor, rng: random.Random):
    if descriptor.type in INTEGERS:
        return rng.choice(INTEGERS[descriptor.type])
    if descriptor.type in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return rng.choice(FLOATS)
    if descriptor.type == FieldDescriptor.TYPE_BOOL:
        return rng.random() < 0.5
    if descriptor.type == FieldDescriptor.TYPE_STRING:
        return rng.choice(["", "../../etc/passwd", "<script>alert(1)</script>", "\u202e" * 50, "x" * 70_000])
    return rng.randbytes(rng.choice([0, 1, 31, 32, 33, 4096]))


def flip_bits(data: bytes, rng: random.Random) -> bytes:
    if not data:
        return data
    flipped = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        position = rng.randrange(len(flipped) * 8)
        flipped[position // 8] ^= 1 << (position % 8)
    return bytes(flipped)


def fuzzed_requests(rpc: Rpc, rng: random.Random, count: int) -> list[bytes]:
    """Serialized requests: random, truncated, bit-flipped, and (mutated, signed again)."""
    valid = encode(rpc, rpc.request)
    requests = []
    for index in range(count):
        kind = index % 5
        if kind == 0:
            requests.append(rng.randbytes(rng.choice([0, 1, 7, 64, 2000])))
        elif kind == 1:
            requests.append(valid[: rng.randrange(len(valid) + 1)])
        elif kind == 2:
            requests.append(flip_bits(valid, rng))
        elif kind == 3:
            mutated = type(rpc.request)()
            mutated.CopyFrom(rpc.request)
            mutate(mutated, rng)
            requests.append(encode(rpc, mutated))
        elif rpc.signer is not None:
            payload = flip_bits(rpc.request.SerializeToString(), rng)
            requests.append(seal(rpc.signer, rpc.path, payload).SerializeToString())
        else:
            requests.append(valid)
    return requests


def encode(rpc: Rpc, request: Message) -> bytes:
    if rpc.signer is None:
        return request.SerializeToString()
    return seal(rpc.signer, rpc.path, request.SerializeToString()).SerializeToString()


@dataclass
class Outcomes:
    codes: Counter = field(default_factory=Counter)
    unknown: list[str] = field(default_factory=list)
    num_bytes_sent: int = 0
    # By RPC: the bytes of its refused requests, and what the store grew by while they were answered.
    refused_bytes: Counter = field(default_factory=Counter)
    refused_stored: Counter = field(default_factory=Counter)
    largest_growth: tuple[int, int, str] = (0, 0, "")  # one refused request's: store growth, its bytes, its RPC


async def call(channel: grpc.aio.Channel, rpc: Rpc, request: bytes, outcomes: Outcomes) -> bool:
    """Send one request; whether it was refused (an error status, or a receipt accepting nothing)."""
    metadata = OPERATOR if rpc.operator else None
    outcomes.num_bytes_sent += len(request)
    refused = False
    try:
        if rpc.kind == "response_stream":
            async for _ in channel.unary_stream(rpc.path)(request, metadata=metadata, timeout=60):
                pass
        elif rpc.kind == "request_stream":
            await channel.stream_unary(rpc.path)(iter([request, UPLOAD_DATA]), metadata=metadata, timeout=60)
        else:
            reply = await channel.unary_unary(rpc.path)(request, metadata=metadata, timeout=60)
            refused = rpc.name == "SubmitRollouts" and rollout_pb2.Receipt.FromString(reply).num_accepted == 0
        code = grpc.StatusCode.OK
    except grpc.aio.AioRpcError as error:
        code, refused = error.code(), True
        if code == grpc.StatusCode.UNKNOWN:
            outcomes.unknown.append(f"{rpc.path}: {error.details()}")
    outcomes.codes[rpc.path, code.name] += 1
    return refused


def store_bytes(cluster: Cluster) -> int:
    """Bytes the store's tables and indexes hold (SQLite's dbstat: page bytes in use)."""
    connection = sqlite3.connect(f"file:{cluster.coordinator_dir / 'coordinator.sqlite3'}?mode=ro", uri=True)
    try:
        return connection.execute("SELECT SUM(pgsize - unused) FROM dbstat").fetchone()[0]
    finally:
        connection.close()


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def synthetic_batch(lease: rollout_pb2.WorkLease, num_tokens: int = MAX_TOKENS) -> RolloutBatch:
    """A well-formed batch for `lease` (its rewards are not checked to be right)."""
    tokens = tuple(5 + i for i in range(num_tokens))
    num_chunks = -(-num_tokens // commitment.CHUNK_TOKENS)
    return RolloutBatch(
        lease.lease_id,
        lease.policy_version,
        tuple(
            RolloutGroup(
                prompt.prompt_index,
                tuple(
                    Rollout(
                        sample,
                        tokens,
                        (True,) * num_tokens,
                        (-0.5,) * num_tokens,
                        bytes(commitment.PROOF_BYTES * num_chunks),
                        FinishReason.LENGTH,
                        0.0,
                    )
                    for sample in range(lease.group_size)
                ),
            )
            for prompt in lease.prompts
        ),
        "fuzz",
    )


class Caller:
    """A registered node's and the trainer's honest calls."""

    def __init__(self, channel: grpc.aio.Channel, node: Identity, trainer: Identity):
        self.stub = {
            "NodeService": service_pb2_grpc.NodeServiceStub(channel),
            "TrainerService": service_pb2_grpc.TrainerServiceStub(channel),
        }
        self.node, self.trainer = node, trainer

    async def signed(self, name: str, request: Message, signer: Identity | None = None):
        signer = signer or self.node
        service = "TrainerService" if signer is self.trainer else "NodeService"
        envelope = seal(signer, method_name(service, name), request.SerializeToString())
        return envelope, await getattr(self.stub[service], name)(envelope, timeout=60)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model):
    cluster = Cluster(tmp_path_factory.mktemp("fuzz"), tiny_model, Identity.generate())
    cluster.publish_fixed_policy()
    limits = [
        "server.requests_per_second_per_node",
        "server.request_burst_per_node",
        "server.requests_per_second_trainer",
        "server.request_burst_trainer",
        "server.unauthenticated_requests_per_second_per_address",
        "server.unauthenticated_request_burst_per_address",
    ]
    cluster.start_coordinator(
        "--set",
        "validation.in_process=false",
        "--set",
        f"run.prompts_per_lease={PROMPTS_PER_LEASE}",
        "--set",
        f"run.group_size={GROUP_SIZE}",
        "--set",
        f"run.sampling.max_tokens={MAX_TOKENS}",
        "--set",
        "lease.max_open_per_node=64",
        "--set",
        f"server.max_message_bytes={MAX_MESSAGE_BYTES}",
        *[argument for limit in limits for argument in ("--set", f"{limit}=1000000")],
    )
    yield cluster
    cluster.stop_all()


def every_rpc(node: Identity, trainer: Identity, lease: rollout_pb2.WorkLease) -> list[Rpc]:
    batch = convert.batch_to_proto(synthetic_batch(lease))
    header = seal(
        trainer,
        method_name("TrainerService", "UploadBlob"),
        service_pb2.BlobUploadHeader(hash=bytes(32), size=64).SerializeToString(),
    )
    manifest = policy_pb2.SignedManifest(
        manifest=b"\x08\x01", signer_public_key=trainer.public_key, signature=bytes(64)
    )
    return [
        Rpc("NodeService", "GetRunInfo", service_pb2.RunInfoRequest()),
        Rpc("NodeService", "Register", service_pb2.RegisterRequest(display_name="fuzz", engine="torch"), node),
        Rpc("NodeService", "Heartbeat", service_pb2.HeartbeatRequest(policy_version=1, tokens_per_second=3.0), node),
        Rpc("NodeService", "GetManifest", service_pb2.ManifestRequest(version=1)),
        Rpc("NodeService", "GetUpdatePath", service_pb2.UpdatePathRequest(from_version=0)),
        Rpc("NodeService", "FetchBlob", service_pb2.BlobRequest(hash=bytes(32), offset=0), kind="response_stream"),
        Rpc("NodeService", "LeaseWork", service_pb2.LeaseRequest(policy_version=1), node),
        Rpc("NodeService", "SubmitRollouts", batch, node),
        Rpc("NodeService", "ReleaseLease", service_pb2.ReleaseLeaseRequest(lease_id=lease.lease_id), node),
        Rpc("NodeService", "GetNodeStanding", service_pb2.NodeStandingRequest(), node),
        Rpc("TrainerService", "UploadBlob", service_pb2.BlobUpload(header=header), kind="request_stream"),
        Rpc("TrainerService", "PublishPolicy", service_pb2.PublishRequest(manifest=manifest), trainer),
        Rpc(
            "TrainerService",
            "StreamGroups",
            service_pb2.StreamGroupsRequest(max_groups=4, max_staleness=2),
            trainer,
            kind="response_stream",
        ),
        Rpc("TrainerService", "AckGroups", service_pb2.AckRequest(trainer_step=1, consumed_group_ids=["g"]), trainer),
        Rpc("TrainerService", "Resume", service_pb2.ResumeRequest(trainer_step=10**6), trainer),
        Rpc(
            "TrainerService", "ReportMetrics", service_pb2.TrainerMetrics(step=1, metrics_json='{"loss": 1.0}'), trainer
        ),
        Rpc("AdminService", "ListNodes", service_pb2.ListNodesRequest(), operator=True),
        Rpc("AdminService", "BanNode", service_pb2.BanRequest(node_id="nobody", reason="fuzz"), operator=True),
        Rpc("AdminService", "UnbanNode", service_pb2.UnbanRequest(node_id="nobody"), operator=True),
        Rpc("AdminService", "GetRunStatus", service_pb2.RunStatusRequest(), operator=True),
        Rpc("AdminService", "ListVersions", service_pb2.ListVersionsRequest(), operator=True),
        Rpc("AdminService", "ListNodes", service_pb2.ListNodesRequest()),  # without the token
        Rpc(
            "ValidatorService",
            "TakeValidation",
            validation_pb2.TakeValidationRequest(validator_id="v", max_groups=1),
            operator=True,
        ),
        Rpc(
            "ValidatorService",
            "ReportValidation",
            validation_pb2.ReportValidationRequest(
                validator_id="v",
                verdicts=[validation_pb2.ValidationVerdict(group_id="g", check="all", evidence_json="{}")],
            ),
            operator=True,
        ),
    ]


def served_methods() -> set[str]:
    """Every RPC of the coordinator's services, from the .proto files."""
    return {
        method_name(service.name, method.name)
        for module in (service_pb2, validation_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }


def test_the_fuzz_covers_every_rpc():
    lease = rollout_pb2.WorkLease(lease_id="l", policy_version=1, group_size=1)
    identity = Identity.generate()
    assert {rpc.path for rpc in every_rpc(identity, identity, lease)} == served_methods()


def test_every_rpc_under_fuzz(cluster):
    rng = random.Random(SEED)
    pid = cluster.processes[0].popen.pid

    async def scenario():
        async with open_aio_channel(cluster.address, cluster.coordinator_tls) as channel:
            caller = Caller(channel, Identity.generate(), cluster.trainer_identity)
            await caller.signed("Register", service_pb2.RegisterRequest(display_name="fuzz", engine="torch"))
            _, reply = await caller.signed("LeaseWork", service_pb2.LeaseRequest(policy_version=1))
            rpcs = every_rpc(caller.node, caller.trainer, reply.lease)
            outcomes = Outcomes()
            rss_before, stored_before = rss_bytes(pid), store_bytes(cluster)
            for rpc in rpcs:
                for request in fuzzed_requests(rpc, rng, NUM_REQUESTS_PER_RPC):
                    before = store_bytes(cluster)
                    if await call(channel, rpc, request, outcomes):
                        outcomes.refused_bytes[rpc.path] += len(request)
                        grown = store_bytes(cluster) - before
                        outcomes.refused_stored[rpc.path] += grown
                        outcomes.largest_growth = max(outcomes.largest_growth, (grown, len(request), rpc.path))
            # Still answering honest calls, from the same address.
            await caller.signed("Heartbeat", service_pb2.HeartbeatRequest(policy_version=1))
            _, fresh = await caller.signed("LeaseWork", service_pb2.LeaseRequest(policy_version=1))
            await channel.unary_unary(method_name("NodeService", "GetRunInfo"))(b"", timeout=60)
            return outcomes, rss_bytes(pid) - rss_before, store_bytes(cluster) - stored_before, fresh

    outcomes, rss_growth, stored, fresh = asyncio.run(scenario())
    codes = Counter()
    for (_, code), count in outcomes.codes.items():
        codes[code] += count
    print(
        f"fuzz: {sum(codes.values())} requests over {len({path for path, _ in outcomes.codes})} RPCs, "
        f"{outcomes.num_bytes_sent} bytes; codes {dict(codes.most_common())}; "
        f"stored {stored} bytes ({stored / outcomes.num_bytes_sent:.3f} per byte sent); "
        f"RSS growth {rss_growth / 2**20:.1f} MiB"
    )
    ratios = {path: outcomes.refused_stored[path] / outcomes.refused_bytes[path] for path in outcomes.refused_bytes}
    worst = max(ratios, key=ratios.__getitem__)
    print(f"most stored per refused byte: {ratios[worst]:.3f} ({worst}, {outcomes.refused_bytes[worst]} bytes refused)")
    print("largest growth from one refused request: {} bytes for a {}-byte {}".format(*outcomes.largest_growth))
    assert ratios[worst] <= MAX_AMPLIFICATION, ratios
    assert cluster.processes[0].popen.poll() is None, "the coordinator exited"
    assert outcomes.unknown == [], outcomes.unknown[:5]
    assert sum(outcomes.codes.values()) >= 20 * NUM_REQUESTS_PER_RPC
    refused = {code for (_, code), n in outcomes.codes.items() if code != "OK"}
    assert {"INVALID_ARGUMENT", "UNAUTHENTICATED"} <= refused
    assert fresh.lease.lease_id or fresh.wait_reason
    assert stored <= MAX_AMPLIFICATION * outcomes.num_bytes_sent, (stored, outcomes.num_bytes_sent)
    assert rss_growth < MAX_RSS_GROWTH_BYTES, rss_growth
    log = cluster.processes[0].log()
    assert "Traceback" not in log
    metrics = urllib.request.urlopen(f"{cluster.http_address()}/metrics", timeout=30).read().decode()
    assert 'rollproof_requests_refused_total{method="/rollproof.v1.NodeService/SubmitRollouts",reason="malformed"}' in (
        metrics
    )


def test_rejected_submissions_store_at_most_4_bytes_per_byte(cluster):
    """The smallest batches that are refused after their envelope verifies, where what is stored
    weighs most against what was sent: empty rollouts for someone else's lease, for an unknown
    lease, for the node's own lease, and for it again."""

    async def scenario():
        async with open_aio_channel(cluster.address, cluster.coordinator_tls) as channel:
            owner = Caller(channel, Identity.generate(), cluster.trainer_identity)
            thief = Caller(channel, Identity.generate(), cluster.trainer_identity)
            for caller in (owner, thief):
                await caller.signed("Register", service_pb2.RegisterRequest(display_name="fuzz", engine="torch"))
            stored_before, num_bytes = store_bytes(cluster), 0
            receipts = []
            for round_index in range(12):
                _, reply = await owner.signed("LeaseWork", service_pb2.LeaseRequest(policy_version=1))
                lease = reply.lease
                empty = rollout_pb2.RolloutBatch(
                    lease_id=lease.lease_id,
                    policy_version=1,
                    groups=[
                        rollout_pb2.RolloutGroup(
                            prompt_index=p.prompt_index,
                            rollouts=[
                                rollout_pb2.Rollout(sample_index=s, finish_reason=int(FinishReason.LENGTH))
                                for s in range(GROUP_SIZE)
                            ],
                        )
                        for p in lease.prompts
                    ],
                )
                unknown = rollout_pb2.RolloutBatch()
                unknown.CopyFrom(empty)
                unknown.lease_id = f"no-such-lease-{round_index}"
                for caller, batch in ((thief, empty), (owner, unknown), (owner, empty), (owner, empty)):
                    envelope = seal(
                        caller.node, method_name("NodeService", "SubmitRollouts"), batch.SerializeToString()
                    )
                    num_bytes += envelope.ByteSize()
                    receipts.append(await caller.stub["NodeService"].SubmitRollouts(envelope, timeout=60))
            return store_bytes(cluster) - stored_before, num_bytes, receipts

    stored, num_bytes, receipts = asyncio.run(scenario())
    print(f"{len(receipts)} refused batches: {num_bytes} bytes sent, {stored} stored ({stored / num_bytes:.3f}/byte)")
    assert len(receipts) == 48 and all(r.num_accepted == 0 and r.num_rejected == 32 for r in receipts)
    assert stored <= MAX_AMPLIFICATION * num_bytes, (stored, num_bytes)


def test_bad_blob_requests_get_clean_errors(cluster):
    async def scenario():
        async with open_aio_channel(cluster.address, cluster.coordinator_tls) as channel:
            codes = {}
            for label, blob_hash in (("empty", b""), ("short", bytes(5)), ("long", bytes(33)), ("absent", bytes(32))):
                try:
                    async for _ in channel.unary_stream(method_name("NodeService", "FetchBlob"))(
                        service_pb2.BlobRequest(hash=blob_hash).SerializeToString(), timeout=60
                    ):
                        pass
                    codes[label] = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as error:
                    codes[label] = error.code()
            return codes

    codes = asyncio.run(scenario())
    assert codes == {
        "empty": grpc.StatusCode.INVALID_ARGUMENT,
        "short": grpc.StatusCode.INVALID_ARGUMENT,
        "long": grpc.StatusCode.INVALID_ARGUMENT,
        "absent": grpc.StatusCode.NOT_FOUND,
    }
    blob_name = next((cluster.coordinator_dir / "policy").rglob("[0-9a-f]" * 64)).name
    request = urllib.request.Request(
        f"{cluster.http_address()}/blobs/{blob_name}", headers={"Range": "bytes=" + "9" * 4300 + "-"}
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 416
    assert os.path.getsize(cluster.processes[0].log_path) < 1_000_000
