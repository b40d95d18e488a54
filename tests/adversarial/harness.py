"""Misbehaving nodes against a real coordinator: a node in the test process that leases
work, generates it with whatever model it likes, tampers with it, signs and submits it;
and the store read back to see what the coordinator concluded."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from envs import get_task
from envs.base import Split
from node.client import CoordinatorClient
from node.generate import generate_batch
from policy.prefill import prefill
from policy.scoring import completion_text
from protocol import commitment, convert
from protocol import sampling as rule
from protocol.identity import Identity
from protocol.proto import service_pb2
from protocol.sampling import derive_sample_seed
from protocol.types import FinishReason, RejectReason, Rollout, RolloutBatch, RolloutGroup, WorkLease
from tests.integration.cluster import Cluster

# Attack name → how far past its bound it landed; written to artifacts/ at the end of the session.
MARGINS: dict[str, dict] = {}


class Attacker:
    def __init__(self, cluster: Cluster, model, tokenizer, engine_name: str = "torch-cpu-float32"):
        from policy.engine import TorchEngine

        self.cluster = cluster
        self.identity = Identity.generate()
        self.client = CoordinatorClient(cluster.address, self.identity, tls=cluster.coordinator_tls)
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
        assert reply.HasField("lease"), f"no lease: {reply.wait_reason}"
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
    rollouts = tuple(dataclasses.replace(r, **changes) if r.sample_index == sample_index else r for r in group.rollouts)
    groups = list(batch.groups)
    groups[group_index] = dataclasses.replace(group, rollouts=rollouts)
    return dataclasses.replace(batch, groups=tuple(groups))


def wait_for_validation(cluster: Cluster, node_id: str, timeout_s: float = 120) -> list[tuple[bool, str, dict]]:
    """The full checks of the node's groups, once no group of it is pending."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pending = cluster.query(
            "SELECT COUNT(*) FROM groups WHERE node_id = ? AND state = 'pending_validation'", node_id
        )[0][0]
        if pending == 0:
            rows = cluster.query(
                "SELECT passed, check_name, evidence_json FROM validation_results WHERE node_id = ?", node_id
            )
            return [(bool(passed), check, json.loads(evidence)) for passed, check, evidence in rows]
        time.sleep(0.3)
    raise AssertionError(f"validation of {node_id} did not finish in {timeout_s}s")


def trainable_groups(cluster: Cluster, node_id: str) -> int:
    """Groups of the node the trainer could use (ready) or used (consumed)."""
    return cluster.query("SELECT COUNT(*) FROM groups WHERE node_id = ? AND state IN ('ready', 'consumed')", node_id)[
        0
    ][0]


def consumed_groups(cluster: Cluster, node_id: str) -> int:
    """The node's groups in the trainer's consumption ledger."""
    return cluster.query(
        "SELECT COUNT(*) FROM group_consumptions c JOIN groups g ON g.group_id = c.group_id WHERE g.node_id = ?",
        node_id,
    )[0][0]


@contextmanager
def consuming_trainer(cluster: Cluster) -> Iterator[None]:
    """A stand-in trainer that consumes every ready group at once, as a trainer with an empty queue
    would: whatever becomes trainable is trained on."""
    from trainer.client import TrainerClient

    stop = threading.Event()
    client = TrainerClient(cluster.address, cluster.trainer_identity, tls=cluster.coordinator_tls, stop=stop)

    def consume() -> None:
        step = 0
        while not stop.is_set():
            groups = client.ready_groups(64, max_staleness=2, timeout=10)
            if groups:
                step += 1
                client.ack(step, [g.group_id for g in groups], [])
            stop.wait(0.2)

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=60)
        client.close()


def run(coroutine):
    return asyncio.run(coroutine)


def rebuilt_batch(
    attacker: Attacker, model, lease: WorkLease, completions: list[list[tuple[int, ...]]]
) -> RolloutBatch:
    """A batch of whatever completions the attacker chose (one list per leased prompt), dressed as an
    honest node would report them under the lease: log-probabilities and activation commitment from a
    prefill on its own model, finish reasons from the last token, rewards from the task's verifier."""

    eos = attacker.tokenizer.eos_token_id
    groups = []
    for position, (prompt, tokens_of_group) in enumerate(zip(lease.prompts, completions, strict=True)):
        problem = attacker.task.problem(Split.TRAIN, attacker.run_info.run_seed, prompt.prompt_index)
        outputs = prefill(model, [(prompt.prompt_token_ids, tokens) for tokens in tokens_of_group])
        rollouts = []
        for sample_index, (tokens, output) in enumerate(zip(tokens_of_group, outputs, strict=True)):
            seed = derive_sample_seed(lease.sampling_seed, position, sample_index)
            logprobs = rule.check_tokens(
                output.logits,
                np.array(tokens),
                np.uint64(seed),
                np.arange(len(tokens), dtype=np.uint64),
                lease.sampling,
            ).logprobs
            rollouts.append(
                Rollout(
                    sample_index=sample_index,
                    token_ids=tuple(tokens),
                    sampled_mask=(True,) * len(tokens),
                    logprobs=tuple(float(x) for x in logprobs),
                    commitment=commitment.commit(output.hidden_bits),
                    finish_reason=FinishReason.STOP if tokens[-1] == eos else FinishReason.LENGTH,
                    claimed_reward=attacker.task.reward(problem, completion_text(attacker.tokenizer, tokens)),
                )
            )
        groups.append(RolloutGroup(prompt.prompt_index, tuple(rollouts)))
    return RolloutBatch(
        lease_id=lease.lease_id, policy_version=lease.policy_version, groups=tuple(groups), engine=attacker.engine_name
    )


def careful_completions(
    attacker: Attacker, model, lease: WorkLease, tolerance: float, pick
) -> list[list[tuple[int, ...]]]:
    """Completions under the lease's seeded rule, except that where a runner-up scores within
    `tolerance` (in scaled logits) of the rule's token, `pick` may take it: a cheat that never strays
    past what a bf16 validator forgives as a near-tie. pick(near, choice, logits, noise, answer, step)
    gets the token ids within tolerance, the rule's token, the logits and Gumbel noise of the position,
    the prompt's reference answer and the position; it returns a token of `near`."""
    params = lease.sampling
    eos = attacker.tokenizer.eos_token_id
    rows = [
        (position, sample_index) for position in range(len(lease.prompts)) for sample_index in range(lease.group_size)
    ]
    answers = [
        attacker.task.problem(Split.TRAIN, attacker.run_info.run_seed, prompt.prompt_index).answer
        for prompt in lease.prompts
    ]
    tokens: list[list[int]] = [[] for _ in rows]
    for step in range(params.max_tokens):
        active = [i for i, t in enumerate(tokens) if not t or (t[-1] != eos and len(t) < params.max_tokens)]
        if not active:
            break
        outputs = prefill(model, [(lease.prompts[rows[i][0]].prompt_token_ids, (*tokens[i], 0)) for i in active])
        for i, output in zip(active, outputs, strict=True):
            position, sample_index = rows[i]
            seed = np.uint64(derive_sample_seed(lease.sampling_seed, position, sample_index))
            logits = output.logits[-1:]
            scaled = logits * rule.inverse_temperature(params.temperature)
            allowed = scaled >= rule.filter_threshold(scaled, params.top_k, params.top_p)[:, None]
            noise = rule.gumbel_noise(np.array([seed]), np.array([step], dtype=np.uint64), logits.shape[1])
            scores = np.where(allowed, scaled + noise, -np.inf)[0]
            choice = int(scores.argmax())
            near = np.flatnonzero(scores >= scores[choice] - tolerance)
            tokens[i].append(int(pick(near, choice, logits[0], noise[0], answers[position], step)))
    return [
        [tuple(tokens[position * lease.group_size + s]) for s in range(lease.group_size)]
        for position in range(len(lease.prompts))
    ]
