"""Coordinator ingest benchmark (issue 5).

Many concurrent simulated nodes — real gRPC clients with signed envelopes — against one
coordinator process on SQLite. Each submission is one group of 8 rollouts of 64 tokens with
log-probabilities and commitments, every accepted rollout committed before its receipt. A
second phase has many registered nodes heartbeat as fast as the coordinator answers.

Baseline, measured in the same run: the store alone (record_submission in this process, no
gRPC, no checks), so `ingest-vs-store-ratio` shows what the service layer costs.

Hostile input (issue 17): a flood of forged requests under the trainer's key id while the real
trainer makes its calls, and the bytes that refused batches leave in the store per byte sent.

Headline figures (last lines): ingest-rollouts-per-s, ingest-p99-ms, heartbeats-per-s,
forged-flood-trainer-ok, rejected-bytes-amplification.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from protocol import commitment, convert  # noqa: E402
from protocol.identity import Identity  # noqa: E402
from protocol.types import FinishReason, Rollout, RolloutBatch, RolloutGroup  # noqa: E402

GROUP_SIZE = 8
NUM_TOKENS = 64


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def synthetic_batch(lease, reward_of) -> RolloutBatch:
    """The simulated node's work: one group of the lease's size, whose rollouts share their
    tokens (so the node scores them once; the coordinator still checks each one)."""
    prompt = lease.prompts[0]
    tokens = tuple(10 + (i * 7 + prompt.prompt_index) % 80 for i in range(NUM_TOKENS))
    num_chunks = -(-NUM_TOKENS // commitment.CHUNK_TOKENS)
    reward = reward_of(prompt, tokens)
    rollouts = tuple(
        Rollout(
            sample_index=i,
            token_ids=tokens,
            sampled_mask=(True,) * NUM_TOKENS,
            logprobs=tuple(-0.5 for _ in range(NUM_TOKENS)),
            commitment=bytes(commitment.PROOF_BYTES * num_chunks),
            finish_reason=FinishReason.LENGTH,
            claimed_reward=reward,
        )
        for i in range(lease.group_size)
    )
    return RolloutBatch(lease.lease_id, lease.policy_version, (RolloutGroup(prompt.prompt_index, rollouts),), "bench")


def start_coordinator(root: Path, model_dir: Path, trainer: Identity) -> tuple[subprocess.Popen, str]:
    from coordinator.blobstore import BlobStore
    from policy.model import load_model
    from trainer.publish import PolicyPublisher

    data_dir = root / "coordinator"
    blobs = BlobStore(data_dir / "policy", run_id="demo", trainer_public_key=trainer.public_key)
    PolicyPublisher(trainer, "demo", blobs).publish_model(1, load_model(model_dir))
    port = free_port()
    with open(root / "coordinator.log", "wb") as log:
        popen = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "rollproof.cli",
                "--log-level",
                "WARNING",
                "coordinator",
                "serve",
                "--data-dir",
                str(data_dir),
                "--model",
                str(model_dir),
                "--grpc-port",
                str(port),
                "--http-port",
                "0",
                "--trainer-key-fingerprint",
                trainer.key_id,
                "--set",
                "validation.enabled=false",
                "--set",
                "run.prompts_per_lease=1",
                "--set",
                f"run.group_size={GROUP_SIZE}",
                "--set",
                f"run.sampling.max_tokens={NUM_TOKENS}",
                "--set",
                "server.requests_per_second_per_node=100000",
                "--set",
                "server.request_burst_per_node=100000",
                "--set",
                "lease.max_open_per_node=64",
                "--set",
                "run.max_backlog_groups=0",
                "--set",
                "server.registration_burst_per_address=100000",
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
        )
    endpoints = data_dir / "endpoints.json"
    deadline = time.monotonic() + 120
    while not endpoints.exists():
        if popen.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the coordinator did not start: {(root / 'coordinator.log').read_text()[-2000:]}")
        time.sleep(0.2)
    return popen, f"127.0.0.1:{port}"


def make_reward_of(model_dir: Path):
    from envs import Split, get_task
    from policy.scoring import completion_text
    from policy.tokenizer import load_tokenizer

    task, tokenizer = get_task("addition"), load_tokenizer(model_dir)

    def reward_of(prompt, tokens) -> float:
        return task.reward(task.problem(Split.TRAIN, 0, prompt.prompt_index), completion_text(tokenizer, tokens))

    return reward_of


async def ingest(address: str, num_nodes: int, seconds: float, reward_of) -> tuple[int, list[float]]:
    from node.client import CoordinatorClient
    from protocol.proto import service_pb2

    clients = [CoordinatorClient(address, Identity.generate()) for _ in range(num_nodes)]
    for client in clients:
        await client.register(service_pb2.RegisterRequest(display_name="bench", engine="bench"))
    latencies: list[float] = []
    accepted = 0
    stop_at = time.monotonic() + seconds

    async def node(client):
        nonlocal accepted
        while time.monotonic() < stop_at:
            reply = await client.lease(1)
            batch = synthetic_batch(convert.lease_from_proto(reply.lease), reward_of)
            payload = convert.batch_to_proto(batch).SerializeToString()
            started = time.perf_counter()
            receipt = await client.submit(payload)
            latencies.append(time.perf_counter() - started)
            accepted += receipt.num_accepted

    started = time.monotonic()
    await asyncio.gather(*(node(c) for c in clients))
    elapsed = time.monotonic() - started
    for client in clients:
        await client.close()
    return round(accepted / elapsed), latencies


async def heartbeats(address: str, num_nodes: int, seconds: float) -> tuple[float, float]:
    """Registered nodes heartbeating back to back; returns (heartbeats/s, p99 latency ms)."""
    from node.client import CoordinatorClient
    from protocol.proto import service_pb2

    client_pool = [CoordinatorClient(address, Identity.generate()) for _ in range(num_nodes)]
    await asyncio.gather(*(c.register(service_pb2.RegisterRequest(display_name="hb")) for c in client_pool))
    latencies: list[float] = []
    stop_at = time.monotonic() + seconds

    async def beat(client):
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            await client.heartbeat(service_pb2.HeartbeatRequest(policy_version=1))
            latencies.append(time.perf_counter() - started)

    started = time.monotonic()
    await asyncio.gather(*(beat(c) for c in client_pool))
    elapsed = time.monotonic() - started
    for client in client_pool:
        await client.close()
    return len(latencies) / elapsed, 1000 * statistics.quantiles(latencies, n=100)[98]


async def forged_flood(address: str, trainer: Identity, num_forged: int, num_trainer_calls: int) -> tuple[int, int]:
    """Forged requests under the trainer's key id (right key, wrong signature), from 16 concurrent
    callers, while the real trainer acknowledges nothing, one call after another. Returns the
    number of the trainer's calls that succeeded and how many forged ones the gate refused."""
    import grpc

    from protocol.channel import open_aio_channel
    from protocol.envelope import method_name, seal
    from protocol.proto import service_pb2, service_pb2_grpc

    method = method_name("TrainerService", "AckGroups")
    payload = service_pb2.AckRequest().SerializeToString()
    num_refused = 0
    async with open_aio_channel(address) as channel:
        stub = service_pb2_grpc.TrainerServiceStub(channel)

        async def attacker(count: int) -> None:
            nonlocal num_refused
            for _ in range(count):
                envelope = seal(trainer, method, payload)
                envelope.signature = bytes(64)
                try:
                    await stub.AckGroups(envelope, timeout=30)
                except grpc.aio.AioRpcError:
                    num_refused += 1

        async def real_trainer() -> int:
            num_ok = 0
            for _ in range(num_trainer_calls):
                try:
                    await stub.AckGroups(seal(trainer, method, payload), timeout=30)
                    num_ok += 1
                except grpc.aio.AioRpcError as error:
                    print(f"the trainer's call failed during the flood: {error.code().name}: {error.details()}")
                await asyncio.sleep(0.01)
            return num_ok

        attackers = [asyncio.create_task(attacker(num_forged // 16)) for _ in range(16)]
        await asyncio.sleep(0.2)  # the flood is on before the trainer's first call
        num_ok = await real_trainer()
        await asyncio.gather(*attackers)
    return num_ok, num_refused


def store_bytes(store_file: Path) -> int:
    """Bytes the store's tables and indexes hold (SQLite's dbstat: page bytes in use)."""
    connection = sqlite3.connect(f"file:{store_file}?mode=ro", uri=True)
    try:
        return connection.execute("SELECT SUM(pgsize - unused) FROM dbstat").fetchone()[0]
    finally:
        connection.close()


async def rejected_amplification(address: str, store_file: Path, num_rounds: int) -> float:
    """Stored bytes per byte sent, over the smallest refused batches (every rollout empty): for
    another node's lease, for an unknown lease, for the node's own lease, and for it again."""
    from node.client import CoordinatorClient
    from protocol.envelope import method_name, seal
    from protocol.proto import rollout_pb2, service_pb2
    from protocol.types import FinishReason

    owner, thief = (CoordinatorClient(address, Identity.generate()) for _ in range(2))
    for client in (owner, thief):
        await client.register(service_pb2.RegisterRequest(display_name="bench", engine="bench"))
    stored_before, num_bytes = store_bytes(store_file), 0
    for round_index in range(num_rounds):
        lease = (await owner.lease(1)).lease
        empty = rollout_pb2.RolloutBatch(
            lease_id=lease.lease_id,
            policy_version=lease.policy_version,
            groups=[
                rollout_pb2.RolloutGroup(
                    prompt_index=prompt.prompt_index,
                    rollouts=[
                        rollout_pb2.Rollout(sample_index=i, finish_reason=int(FinishReason.LENGTH))
                        for i in range(lease.group_size)
                    ],
                )
                for prompt in lease.prompts
            ],
        )
        unknown = rollout_pb2.RolloutBatch()
        unknown.CopyFrom(empty)
        unknown.lease_id = f"no-such-lease-{round_index}"
        for client, batch in ((thief, empty), (owner, unknown), (owner, empty), (owner, empty)):
            envelope = seal(client.identity, method_name("NodeService", "SubmitRollouts"), batch.SerializeToString())
            receipt = await client.stub.SubmitRollouts(envelope, timeout=60)
            assert receipt.num_accepted == 0
            num_bytes += envelope.ByteSize()
    for client in (owner, thief):
        await client.close()
    return (store_bytes(store_file) - stored_before) / num_bytes


def store_baseline(root: Path, num_submissions: int) -> float:
    """Rollouts/s of record_submission alone (the durable write every submission needs)."""
    from coordinator.store import GroupState, NewGroup, NewSubmission, NewVerdict, open_store, sqlite_url
    from coordinator.store.records import LeaseRecord
    from protocol.types import SamplingParams

    store = open_store(sqlite_url(root / "baseline"))
    store.register_node("n", bytes(32), "n", "e", "h", "v", 0)
    group_bytes = bytes(GROUP_SIZE * (NUM_TOKENS * 9 + 600))
    started = time.perf_counter()
    for index in range(num_submissions):
        lease_id = f"lease-{index}"
        store.create_lease(LeaseRecord(lease_id, "n", index, (index,), GROUP_SIZE, SamplingParams(), 1, 1, 0, 10**12))
        store.record_submission(
            NewSubmission(
                batch_hash=index.to_bytes(32, "big"),
                lease_id=lease_id,
                node_id="n",
                created_ms=0,
                receipt=b"r" * 600,
                groups=(
                    NewGroup(
                        f"{lease_id}-0",
                        index,
                        1,
                        group_bytes,
                        GROUP_SIZE * NUM_TOKENS,
                        GROUP_SIZE,
                        GroupState.READY,
                        0.0,
                    ),
                ),
                verdicts=tuple(NewVerdict(index, s, True) for s in range(GROUP_SIZE)),
                rollout_hashes=tuple(index.to_bytes(24, "big") + s.to_bytes(8, "big") for s in range(GROUP_SIZE)),
            )
        )
    elapsed = time.perf_counter() - started
    store.close()
    return num_submissions * GROUP_SIZE / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (< 1 minute)")
    parser.add_argument("--nodes", type=int, default=32, help="concurrent submitting nodes")
    parser.add_argument("--heartbeat-nodes", type=int, default=200, help="concurrent heartbeating nodes")
    args = parser.parse_args()
    seconds = 8.0 if args.quick else 30.0

    from coordinator.store import SQLITE_FILE_NAME
    from policy.model import create_tiny_model

    with tempfile.TemporaryDirectory() as temp:
        root = Path(temp)
        create_tiny_model(root / "model")
        baseline = store_baseline(root, 200 if args.quick else 1000)
        trainer = Identity.generate()
        popen, address = start_coordinator(root, root / "model", trainer)
        try:
            rollouts_per_s, latencies = asyncio.run(
                ingest(address, args.nodes, seconds, make_reward_of(root / "model"))
            )
            beats_per_s, beat_p99 = asyncio.run(heartbeats(address, args.heartbeat_nodes, seconds / 2))
            num_trainer_calls = 50
            num_trainer_ok, num_forged_refused = asyncio.run(
                forged_flood(address, trainer, 2000 if args.quick else 10_000, num_trainer_calls)
            )
            amplification = asyncio.run(
                rejected_amplification(address, root / "coordinator" / SQLITE_FILE_NAME, 10 if args.quick else 50)
            )
        finally:
            os.kill(popen.pid, signal.SIGTERM)
            popen.wait(timeout=60)
    quantiles = statistics.quantiles(latencies, n=100)
    print(
        json.dumps(
            {
                "nodes": args.nodes,
                "seconds": seconds,
                "submissions": len(latencies),
                "p50_ms": round(1000 * quantiles[49], 1),
                "store_only_rollouts_per_s": round(baseline),
                "heartbeat_p99_ms": round(beat_p99, 1),
                "trainer_calls_ok_in_flood": f"{num_trainer_ok}/{num_trainer_calls}",
                "forged_refused": num_forged_refused,
            }
        )
    )
    print(f"ingest-vs-store-ratio: {rollouts_per_s / baseline:.2f} (end to end ÷ store alone)")
    print(f"ingest-rollouts-per-s: {rollouts_per_s} (target: >= 2000 on 2 cores)")
    print(f"ingest-p99-ms: {1000 * quantiles[98]:.1f} (target: < 100)")
    print(f"heartbeats-per-s: {beats_per_s:.0f} (target: >= 1000, i.e. 10,000 nodes every 10 s)")
    print(f"forged-flood-trainer-ok: {int(num_trainer_ok == num_trainer_calls)} (target: 1)")
    print(f"rejected-bytes-amplification: {amplification:.2f} (target: ≤ 4)")


if __name__ == "__main__":
    main()
