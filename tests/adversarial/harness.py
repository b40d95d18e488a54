"""Misbehaving nodes against a real coordinator: a node in the test process that leases
work, generates it with whatever model it likes, tampers with it, signs and submits it;
and the store read back to see what the coordinator concluded."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time

from envs import get_task
from node.client import CoordinatorClient
from node.generate import generate_batch
from protocol import convert
from protocol.identity import Identity
from protocol.proto import service_pb2
from protocol.types import RejectReason, RolloutBatch, WorkLease
from tests.integration.cluster import Cluster

# Attack name → how far past its bound it landed; written to artifacts/ at the end of the session.
MARGINS: dict[str, dict] = {}


class Attacker:
    def __init__(self, cluster: Cluster, model, tokenizer, engine_name: str = "torch-cpu-float32"):
        from policy.engine import TorchEngine

        self.cluster = cluster
        self.identity = Identity.generate()
        self.client = CoordinatorClient(cluster.address, self.identity)
        self.tokenizer = tokenizer
        self.engine = TorchEngine(model, stop_token_ids={tokenizer.eos_token_id})
        self.engine_name = engine_name

    async def start(self) -> Attacker:
        self.run_info = await self.client.run_info()
        self.task = get_task(self.run_info.task)
        await self.client.register(service_pb2.RegisterRequest(display_name="attacker", engine=self.engine_name))
        return self

    async def lease(self) -> WorkLease:
        reply = await self.client.lease(self.run_info.latest_policy_version)
        assert reply.HasField("lease"), "no lease"
        return convert.lease_from_proto(reply.lease)

    def generate(self, lease: WorkLease, engine=None) -> RolloutBatch:
        return generate_batch(
            engine or self.engine, self.tokenizer, self.task, self.run_info.run_seed, lease, self.engine_name
        ).batch

    async def submit(self, batch: RolloutBatch):
        return await self.client.submit(convert.batch_to_proto(batch).SerializeToString())

    @property
    def node_id(self) -> str:
        return self.identity.key_id

    async def close(self) -> None:
        await self.client.close()


def rejected_reasons(receipt) -> set[str]:
    return {RejectReason(v.reason).name for v in receipt.verdicts if not v.accepted}


def replace_rollout(batch: RolloutBatch, group_index: int, sample_index: int, **changes) -> RolloutBatch:
    group = batch.groups[group_index]
    rollouts = tuple(
        dataclasses.replace(r, **changes) if r.sample_index == sample_index else r for r in group.rollouts
    )
    groups = list(batch.groups)
    groups[group_index] = dataclasses.replace(group, rollouts=rollouts)
    return dataclasses.replace(batch, groups=tuple(groups))


def wait_for_validation(cluster: Cluster, node_id: str, timeout_s: float = 120) -> list[tuple[bool, str, dict]]:
    """The full checks of the node's groups, once no group of it is pending."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pending = cluster.query("SELECT COUNT(*) FROM groups WHERE node_id = ? AND state = 'pending_validation'", node_id
        )[0][0]
        if pending == 0:
            rows = cluster.query("SELECT passed, check_name, evidence_json FROM validation_results WHERE node_id = ?", node_id
            )
            return [(bool(passed), check, json.loads(evidence)) for passed, check, evidence in rows]
        time.sleep(0.3)
    raise AssertionError(f"validation of {node_id} did not finish in {timeout_s}s")


def trainable_groups(cluster: Cluster, node_id: str) -> int:
    """Groups of the node the trainer could use (ready) or used (consumed)."""
    return cluster.query("SELECT COUNT(*) FROM groups WHERE node_id = ? AND state IN ('ready', 'consumed')", node_id
    )[0][0]


def run(coroutine):
    return asyncio.run(coroutine)
