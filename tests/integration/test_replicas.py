"""Coordinator replicas: several `rollproof coordinator serve` processes on one PostgreSQL store and
one data directory, any of them serving any request (issue 22). Two replicas on their own ports
stand for replicas behind a load balancer, so a test can pick which one a request reaches;
`--processes 2` runs them on one shared port."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from coordinator.store import LeaseRecord, LeaseState
from protocol import commitment, convert
from protocol.envelope import method_name, seal
from protocol.identity import Identity
from protocol.proto import service_pb2
from protocol.types import FinishReason, Rollout, RolloutBatch, RolloutGroup
from tests.integration.cluster import postgres_database

GROUP_SIZE = 4
NUM_TOKENS = 32
COORDINATOR_SETTINGS = (
    "validation.enabled=false",
    "run.prompts_per_lease=2",
    f"run.group_size={GROUP_SIZE}",
    f"run.sampling.max_tokens={NUM_TOKENS}",
    "run.max_backlog_groups=0",
    "lease.max_open_per_node=8",
    "lease.max_walkaway_fraction=0.9",
    "server.registration_burst_per_address=10000",
)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def postgres_url() -> Iterator[str]:
    with postgres_database() as url:
        yield url


@dataclass
class Run:
    """A run's data directory (policy version 1 published) and the replicas serving it."""

    root: Path
    model_dir: Path
    store_url: str
    trainer: Identity = field(default_factory=Identity.generate)
    processes: list[subprocess.Popen] = field(default_factory=list)

    def __post_init__(self) -> None:
        from coordinator.blobstore import BlobStore
        from policy.model import load_model
        from trainer.publish import PolicyPublisher

        blobs = BlobStore(self.data_dir / "policy", run_id="demo", trainer_public_key=self.trainer.public_key)
        PolicyPublisher(self.trainer, "demo", blobs).publish_model(1, load_model(self.model_dir))

    @property
    def data_dir(self) -> Path:
        return self.root / "coordinator"

    def serve_command(self, *extra: str) -> list[str]:
        command = [sys.executable, "-m", "rollproof.cli", "coordinator", "serve", "--data-dir", str(self.data_dir)]
        command += ["--model", str(self.model_dir), "--trainer-key-fingerprint", self.trainer.key_id]
        for setting in (*COORDINATOR_SETTINGS, f"store.url={self.store_url}"):
            command += ["--set", setting]
        return command + list(extra)

    def start(self, name: str, *extra: str, ready_lines: int = 1) -> tuple[subprocess.Popen, Path]:
        """Start `coordinator serve` with extra flags; returns once ready_lines replicas print their address."""
        log_path = self.root / f"{name}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                self.serve_command(*extra),
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                start_new_session=True,
            )
        self.processes.append(process)
        deadline = time.monotonic() + 180
        while log_path.read_text(errors="replace").count("coordinator grpc=") < ready_lines:
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{name} did not start:\n{log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)
        return process, log_path

    def start_replica(self, name: str) -> tuple[subprocess.Popen, str]:
        port = _free_port()
        process, _ = self.start(name, "--grpc-port", str(port), "--http-port", "0")
        return process, f"127.0.0.1:{port}"

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(timeout=30)

    def leases(self) -> tuple[list[LeaseRecord], int]:
        """Every lease in the store, and the number of prompt sets waiting to be leased again."""
        from sqlalchemy import select

        from coordinator.store import open_store
        from coordinator.store.rows import lease_record
        from coordinator.store.statements import LEASES

        store = open_store(self.store_url, pool_size=1)
        try:
            with store.database.read() as connection:
                leases = [lease_record(row) for row in connection.execute(select(LEASES))]
            return leases, store.num_requeued()
        finally:
            store.close()


@pytest.fixture
def run(tmp_path, tiny_model, postgres_url) -> Iterator[Run]:
    run = Run(tmp_path, tiny_model, postgres_url)
    try:
        yield run
    finally:
        run.stop()


def _reward_of(model_dir: Path):
    from envs import Split, get_task
    from policy.scoring import completion_text
    from policy.tokenizer import load_tokenizer

    task, tokenizer = get_task("addition"), load_tokenizer(model_dir)
    return lambda index, tokens: task.reward(task.problem(Split.TRAIN, 0, index), completion_text(tokenizer, tokens))


def _work(lease: service_pb2.WorkLease, reward_of) -> bytes:
    """A batch that passes the cheap checks: every sample of a prompt the same tokens, rightly scored."""
    groups = []
    for prompt in lease.prompts:
        tokens = tuple(10 + (i * 7 + prompt.prompt_index) % 80 for i in range(NUM_TOKENS))
        reward = reward_of(prompt.prompt_index, tokens)
        rollouts = tuple(
            Rollout(
                sample_index=sample,
                token_ids=tokens,
                sampled_mask=(True,) * NUM_TOKENS,
                logprobs=(-0.5,) * NUM_TOKENS,
                commitment=bytes(commitment.PROOF_BYTES * -(-NUM_TOKENS // commitment.CHUNK_TOKENS)),
                finish_reason=FinishReason.LENGTH,
                claimed_reward=reward,
            )
            for sample in range(lease.group_size)
        )
        groups.append(RolloutGroup(prompt.prompt_index, rollouts))
    batch = RolloutBatch(lease.lease_id, lease.policy_version, tuple(groups), "test")
    return convert.batch_to_proto(batch).SerializeToString()


async def _register(clients) -> None:
    await asyncio.gather(
        *(client.register(service_pb2.RegisterRequest(display_name="r", engine="test")) for client in clients)
    )


@pytest.mark.postgres
def test_leases_through_two_replicas_are_never_issued_twice_and_a_nonce_replayed_to_the_other_is_refused(run):
    from node.client import CoordinatorClient

    _, address_a = run.start_replica("replica-a")
    _, address_b = run.start_replica("replica-b")
    num_nodes, num_rounds = 12, 4

    async def scenario() -> None:
        identities = [Identity.generate() for _ in range(num_nodes)]
        # Each node talks to both replicas, alternating, so a node's own requests race across them.
        clients = [(CoordinatorClient(address_a, i), CoordinatorClient(address_b, i)) for i in identities]
        await _register([pair[0] for pair in clients])

        async def node(pair) -> None:
            for round_number in range(num_rounds):
                leases = await asyncio.gather(*(client.lease(1) for client in pair for _ in range(2)))
                for index, reply in enumerate(leases):
                    assert reply.HasField("lease"), reply
                    if (index + round_number) % 2:  # half go back: their prompt sets are requeued and taken again
                        await pair[index % 2].release(reply.lease.lease_id)
                    else:
                        await pair[(index + 1) % 2].submit(_work(reply.lease, lambda *_: 0.0))

        await asyncio.gather(*(node(pair) for pair in clients))

        # A nonce taken by one replica is refused by the other.
        envelope = seal(identities[0], method_name("NodeService", "Heartbeat"), b"")
        await clients[0][0].stub.Heartbeat(envelope, timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as replay:
            await clients[0][1].stub.Heartbeat(envelope, timeout=10)
        assert replay.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "replayed_nonce" in replay.value.details()
        for pair in clients:
            for client in pair:
                await client.close()

    asyncio.run(scenario())
    leases, num_requeued = run.leases()
    assert len(leases) == num_nodes * num_rounds * 4
    assert len({lease.lease_id for lease in leases}) == len(leases)
    live_numbers = [lease.lease_number for lease in leases if lease.state in (LeaseState.OPEN, LeaseState.SUBMITTED)]
    assert len(live_numbers) == len(set(live_numbers)), "a prompt set was held by two live leases at once"
    # Each released set was leased again or waits in the queue, exactly once.
    num_released = sum(lease.state is LeaseState.RELEASED for lease in leases)
    assert num_released > 0
    assert num_released == len(leases) - len({lease.lease_number for lease in leases}) + num_requeued
    for lease in leases:
        if lease.state is LeaseState.RELEASED:
            again = [other for other in leases if other.lease_number == lease.lease_number and other is not lease]
            assert all(other.node_id != lease.node_id for other in again), "a node got back a set it walked away from"


def _housekeeping_lock_holder(store_url: str) -> int | None:
    """The server process id of the session holding the run's housekeeping lock, if any."""
    import psycopg
    from sqlalchemy.engine import make_url

    from coordinator.store.leadership import housekeeping_lock_key

    key = housekeeping_lock_key("public") & 0xFFFFFFFFFFFFFFFF  # the run's store is in its own database
    with psycopg.connect(f"host=127.0.0.1 port=5432 user=postgres dbname={make_url(store_url).database}") as db:
        row = db.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND database = "
            "(SELECT oid FROM pg_database WHERE datname = current_database()) AND classid = %s AND objid = %s",
            (key >> 32, key & 0xFFFFFFFF),
        ).fetchone()
    return None if row is None else row[0]


@pytest.mark.postgres
def test_a_replica_killed_mid_run_loses_nothing_and_the_other_takes_over_housekeeping(run):
    from coordinator.store import GroupState, open_store
    from node.client import CoordinatorClient

    holder, address_a = run.start_replica("replica-a")  # started first: it holds the housekeeping lock
    _, address_b = run.start_replica("replica-b")
    first_holder = _housekeeping_lock_holder(run.store_url)
    assert first_holder is not None
    reward_of = _reward_of(run.model_dir)
    num_nodes, num_cycles, kill_after = 6, 5, 10
    receipts: dict[bytes, int] = {}  # batch hash -> rollouts accepted, as the node was told

    async def scenario() -> None:
        identities = [Identity.generate() for _ in range(num_nodes)]
        clients = [(CoordinatorClient(address_a, i), CoordinatorClient(address_b, i)) for i in identities]
        await _register([pair[1] for pair in clients])

        async def call(pair, cycle, method, *args):
            """Through replica A on even cycles, B on odd ones; B when A does not answer."""
            if cycle % 2 == 0 and holder.poll() is None:
                try:
                    return await getattr(pair[0], method)(*args)
                except grpc.aio.AioRpcError as error:
                    if error.code() is not grpc.StatusCode.UNAVAILABLE:
                        raise
            return await getattr(pair[1], method)(*args)

        async def node(pair) -> None:
            for cycle in range(num_cycles):
                reply = await call(pair, cycle, "lease", 1)
                assert reply.HasField("lease"), reply
                payload = _work(reply.lease, reward_of)
                receipt = await call(pair, cycle, "submit", payload)
                receipts[receipt.batch_hash] = receipt.num_accepted
                if len(receipts) == kill_after:
                    os.kill(holder.pid, signal.SIGKILL)

        await asyncio.gather(*(node(pair) for pair in clients))
        for pair in clients:
            for client in pair:
                await client.close()

    asyncio.run(scenario())
    assert holder.wait(timeout=30) == -signal.SIGKILL
    assert len(receipts) == num_nodes * num_cycles
    assert sum(receipts.values()) == num_nodes * num_cycles * 2 * GROUP_SIZE, "the batches were not all accepted"
    store = open_store(run.store_url, pool_size=1)
    try:
        assert all(store.get_receipt(batch_hash) is not None for batch_hash in receipts)
        assert store.count_groups([GroupState.READY]) == num_nodes * num_cycles * 2
    finally:
        store.close()
    # The survivor takes the housekeeping lock on its next round.
    deadline = time.monotonic() + 30
    while _housekeeping_lock_holder(run.store_url) in (None, first_holder):
        assert time.monotonic() < deadline, "no replica took over the housekeeping lock"
        time.sleep(0.5)


def _children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.postgres
def test_processes_starts_replicas_on_one_port_and_restarts_one_that_dies(run):
    from node.client import CoordinatorClient

    port = _free_port()
    supervisor, log_path = run.start("replicas", "--processes", "2", "--grpc-port", str(port), ready_lines=2)
    replicas = _children(supervisor.pid)
    assert len(replicas) == 2

    async def lease_and_submit(num_nodes: int) -> None:
        clients = [CoordinatorClient(f"127.0.0.1:{port}", Identity.generate()) for _ in range(num_nodes)]
        await _register(clients)
        for client in clients:
            reply = await client.lease(1)
            receipt = await client.submit(_work(reply.lease, lambda *_: 0.0))
            assert len(receipt.verdicts) == 2 * GROUP_SIZE
            await client.close()

    asyncio.run(lease_and_submit(8))
    os.kill(replicas[0], signal.SIGKILL)
    deadline = time.monotonic() + 180
    while log_path.read_text(errors="replace").count("coordinator grpc=") < 3:
        assert time.monotonic() < deadline, f"the replica was not restarted:\n{log_path.read_text()[-3000:]}"
        time.sleep(0.5)
    replicas = _children(supervisor.pid)
    assert len(replicas) == 2
    asyncio.run(lease_and_submit(8))
    os.kill(supervisor.pid, signal.SIGTERM)
    assert supervisor.wait(timeout=60) == 0
    assert not [pid for pid in replicas if Path(f"/proc/{pid}").exists()], "a replica outlived its supervisor"


def test_processes_refuses_a_sqlite_store(tmp_path, rollproof_command):
    result = subprocess.run(
        [*rollproof_command, "coordinator", "serve", "--data-dir", str(tmp_path), "--processes", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "set store.url to a PostgreSQL database" in result.stderr


def test_a_version_published_through_one_replica_is_served_by_the_other(tmp_path):
    """Replicas share the data directory and the store: one that did not take the upload reads the
    version from both on its next housekeeping round, and tells its listeners (the seed peer)."""
    import numpy as np

    from coordinator.blobstore import BlobStore
    from coordinator.store import open_store, sqlite_url
    from coordinator.versions import PolicyVersions
    from tests.unit.test_codec import perturb, random_bf16_state
    from trainer.publish import PolicyPublisher

    trainer = Identity.generate()
    store = open_store(sqlite_url(tmp_path))
    try:
        replicas = [
            PolicyVersions(
                BlobStore(tmp_path / "policy", run_id="demo", trainer_public_key=trainer.public_key),
                store,
                trainer.public_key,
            )
            for _ in range(2)
        ]
        announced: list[bytes] = []  # the manifests replica 1 told its listeners of
        replicas[1].on_publish.append(lambda signed: announced.append(signed.manifest_bytes))

        class Upload:
            """What the trainer's RPCs to replica 0 do: its blobs, then the manifest."""

            def put_version(self, signed, blobs):
                for blob_hash, data in blobs.items():
                    replicas[0].blobs.put_blob(blob_hash, data)
                return replicas[0].publish(signed)

        publisher = PolicyPublisher(trainer, "demo", Upload())
        state = random_bf16_state(np.random.default_rng(0), {"layer.weight": (16, 32)})
        publisher.publish(1, state)
        assert replicas[1].refresh()
        assert announced == [replicas[0].manifest(1).manifest_bytes]
        assert not replicas[1].refresh(), "nothing newer"
        publisher.publish(2, perturb(np.random.default_rng(1), state, 0.01))
        assert replicas[1].refresh()
        assert announced[1:] == [replicas[0].manifest(2).manifest_bytes]
        for version in (1, 2):
            assert replicas[1].manifest(version).manifest_bytes == replicas[0].manifest(version).manifest_bytes
        assert [manifest.manifest_bytes for manifest in replicas[1].update_path(None)] == [
            manifest.manifest_bytes for manifest in replicas[0].update_path(None)
        ]
    finally:
        store.close()
