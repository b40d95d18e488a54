"""Every cheap-check rejection of issue 5, against a real coordinator process."""

import asyncio
import dataclasses
import time

import grpc
import pytest

from envs import get_task
from node.client import CoordinatorClient
from node.generate import generate_batch
from protocol import convert
from protocol.envelope import method_name, seal
from protocol.identity import Identity
from protocol.proto import service_pb2
from protocol.types import RejectReason, RolloutBatch
from tests.integration.cluster import checking_cluster

# Long enough for a lease, generate and submit on a loaded 2-core machine; the late-submission case
# sleeps through it.
LEASE_DEADLINE_S = 10


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model):
    with checking_cluster(
        tmp_path_factory.mktemp("rejections"),
        tiny_model,
        f"lease.deadline_s={LEASE_DEADLINE_S}",
        "lease.max_open_per_node=8",
        "run.group_size=2",
        "run.sampling.max_tokens=8",
        "server.max_message_bytes=65536",
    ) as cluster:
        yield cluster


class Node:
    def __init__(self, cluster, engine):
        self.client = CoordinatorClient(cluster.address, Identity.generate(), tls=cluster.coordinator_tls)
        self.engine, self.tokenizer = engine

    async def start(self):
        self.run_info = await self.client.run_info()
        await self.client.register(service_pb2.RegisterRequest(display_name="tester", engine="torch"))

    async def honest_batch(self) -> RolloutBatch:
        reply = await self.client.lease(1)
        lease = convert.lease_from_proto(reply.lease)
        return generate_batch(
            self.engine, self.tokenizer, get_task(self.run_info.task), self.run_info.run_seed, lease, "torch"
        ).batch

    async def submit(self, batch: RolloutBatch):
        return await self.client.submit(convert.batch_to_proto(batch).SerializeToString())


def reasons(receipt) -> set[str]:
    return {RejectReason(v.reason).name for v in receipt.verdicts if not v.accepted}


def with_rollout(batch: RolloutBatch, **changes) -> RolloutBatch:
    group = batch.groups[0]
    changed = dataclasses.replace(group.rollouts[0], **changes)
    return dataclasses.replace(
        batch, groups=(dataclasses.replace(group, rollouts=(changed, *group.rollouts[1:])), *batch.groups[1:])
    )


def run(coroutine):
    return asyncio.run(coroutine)


def test_honest_batch_is_accepted_and_a_resend_gets_the_same_receipt(cluster, engine):
    async def scenario():
        node = Node(cluster, engine)
        await node.start()
        batch = await node.honest_batch()
        first = await node.submit(batch)
        again = await node.submit(batch)
        await node.client.close()
        return first, again

    first, again = run(scenario())
    assert first.num_accepted == 4 and first.num_rejected == 0
    assert again == first


@pytest.mark.parametrize(
    ("name", "tamper", "expected"),
    [
        ("wrong policy version", lambda b, vocab: dataclasses.replace(b, policy_version=2), "WRONG_POLICY_VERSION"),
        (
            "token out of vocabulary",
            lambda b, vocab: with_rollout(b, token_ids=(vocab + 5, *b.groups[0].rollouts[0].token_ids[1:])),
            "TOKEN_OUT_OF_VOCAB",
        ),
        (
            "longer than max_tokens",
            lambda b, vocab: with_rollout(
                b,
                token_ids=(10,) * 9,
                sampled_mask=(True,) * 9,
                logprobs=(-1.0,) * 9,
            ),
            "TOO_LONG",
        ),
        (
            "wrong group size",
            lambda b, vocab: dataclasses.replace(
                b, groups=(dataclasses.replace(b.groups[0], rollouts=b.groups[0].rollouts[:1]), *b.groups[1:])
            ),
            "WRONG_GROUP_SIZE",
        ),
        (
            "inflated reward",
            lambda b, vocab: with_rollout(b, claimed_reward=1.0 - b.groups[0].rollouts[0].claimed_reward),
            "REWARD_MISMATCH",
        ),
        (
            "same prompt twice",
            lambda b, vocab: dataclasses.replace(b, groups=(b.groups[0], b.groups[0])),
            "DUPLICATE",
        ),
    ],
)
def test_tampered_batches_are_rejected_with_their_reason(cluster, engine, name, tamper, expected):
    async def scenario():
        node = Node(cluster, engine)
        await node.start()
        receipt = await node.submit(tamper(await node.honest_batch(), node.run_info.vocab_size))
        await node.client.close()
        return receipt

    receipt = run(scenario())
    assert expected in reasons(receipt), f"{name}: {[(v.reason, v.message) for v in receipt.verdicts]}"
    if expected != "DUPLICATE":
        tampered_prompt = receipt.verdicts[0].prompt_index
        assert not any(v.accepted for v in receipt.verdicts if v.prompt_index == tampered_prompt)


def test_lease_rejections(cluster, engine):
    async def scenario():
        owner, thief = Node(cluster, engine), Node(cluster, engine)
        await owner.start()
        await thief.start()
        stolen = await thief.submit(await owner.honest_batch())
        late_batch = await owner.honest_batch()
        await asyncio.sleep(LEASE_DEADLINE_S + 1.5)
        late = await owner.submit(late_batch)
        batch = await owner.honest_batch()
        await owner.submit(batch)
        twice = await owner.submit(dataclasses.replace(batch, engine="torch-again"))
        await owner.client.close()
        await thief.client.close()
        return stolen, late, twice

    stolen, late, twice = run(scenario())
    assert reasons(stolen) == {"LEASE_NOT_OWNED"}
    assert reasons(late) == {"LEASE_EXPIRED"}
    assert reasons(twice) == {"DUPLICATE"}


def test_envelope_rejections_and_oversized_messages(cluster, engine):
    async def scenario():
        node = Node(cluster, engine)
        await node.start()
        payload = service_pb2.HeartbeatRequest(policy_version=1).SerializeToString()
        method = method_name("NodeService", "Heartbeat")
        outcomes = {}

        async def attempt(label, envelope):
            try:
                await node.client.stub.Heartbeat(envelope, timeout=10)
                outcomes[label] = "accepted"
            except grpc.aio.AioRpcError as error:
                outcomes[label] = (error.code(), error.details())

        unsigned = seal(node.client.identity, method, payload)
        unsigned.signature = b""
        await attempt("unsigned", unsigned)
        forged = seal(node.client.identity, method, payload)
        forged.signature = bytes([forged.signature[0] ^ 1]) + forged.signature[1:]
        await attempt("badly signed", forged)
        replayed = seal(node.client.identity, method, payload)
        await attempt("first", replayed)
        await attempt("replayed", replayed)
        await attempt(
            "stale", seal(node.client.identity, method, payload, timestamp_ms=int(time.time() * 1000) - 600_000)
        )
        await attempt("unregistered", seal(Identity.generate(), method, payload))
        try:
            await node.client.submit(b"\x0a" + b"\xff" * 100_000)
            outcomes["oversized"] = "accepted"
        except grpc.aio.AioRpcError as error:
            outcomes["oversized"] = (error.code(), error.details())
        try:
            await node.client.submit(b"\xff\xff\xff")
            outcomes["garbage"] = "accepted"
        except grpc.aio.AioRpcError as error:
            outcomes["garbage"] = (error.code(), error.details())
        await node.client.close()
        return outcomes

    outcomes = run(scenario())
    assert outcomes["first"] == "accepted"
    assert (
        outcomes["unsigned"][0] == grpc.StatusCode.UNAUTHENTICATED and "malformed_envelope" in outcomes["unsigned"][1]
    )
    assert (
        outcomes["badly signed"][0] == grpc.StatusCode.UNAUTHENTICATED
        and "bad_signature" in outcomes["badly signed"][1]
    )
    assert outcomes["replayed"][0] == grpc.StatusCode.UNAUTHENTICATED and "replayed_nonce" in outcomes["replayed"][1]
    assert outcomes["stale"][0] == grpc.StatusCode.UNAUTHENTICATED and "stale_timestamp" in outcomes["stale"][1]
    assert (
        outcomes["unregistered"][0] == grpc.StatusCode.UNAUTHENTICATED
        and "not registered" in outcomes["unregistered"][1]
    )
    assert outcomes["oversized"][0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert outcomes["garbage"][0] == grpc.StatusCode.INVALID_ARGUMENT and "RolloutBatch" in outcomes["garbage"][1]
