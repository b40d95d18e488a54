"""Fleet benchmark (issue 22): how many nodes with a realistic cycle one and two coordinator
replicas on PostgreSQL serve within a p99 latency of 250 ms.

A simulated node heartbeats every 30 s, and leases 4 prompts × 8 samples, works 30–60 s (a GPU
node generating 64–256 tokens per sample) and submits the signed batch, then leases again. Nodes
start at random points of their cycle and latencies count after one full work period, so the
load is steady. Many nodes run in one simulator process (asyncio gRPC clients sharing a pool of
channels: connections are what SO_REUSEPORT spreads over the replicas), in several processes.

The cycle runs `--time-scale` times faster than real time, so one simulated node stands for that
many real ones (the coordinator's load is the request rate): node counts printed are real-node
equivalents. Validation is off (at scale validators are processes of their own) and the backlog
unbounded (no trainer consumes).

For 1 and 2 replicas the node count climbs a ladder until the p99 latency of all requests
(heartbeat, lease, submit) passes 250 ms or a request fails; the largest level within it is
`fleet-nodes-at-p99-250ms`. Before the ladder (1 replica), one request kind at a time measures
the CPU it costs the coordinator and PostgreSQL (ms per request), its bytes and its store commits.

The simulators share the machine with the coordinators (and on a loaded machine with others): the
load (`uptime`) is printed before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import multiprocessing
import os
import random
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

HEARTBEAT_S = 30.0
WORK_S = (30.0, 60.0)
PROMPTS_PER_LEASE = 4
GROUP_SIZE = 8
NUM_TOKENS = (64, 256)
P99_TARGET_MS = 250.0
POSTGRES_CONNINFO = "host=127.0.0.1 port=5432 user=postgres dbname=test connect_timeout=3"
KINDS = ("heartbeat", "lease", "submit", "release")
CHANNELS_PER_SIMULATOR = 32
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) >= 2 else (values[0] if values else 0.0)


# ---- simulated nodes, in simulator processes ----


class RewardOf:
    """The task's reward of a completion: what an honest node claims."""

    def __init__(self, model_dir: Path):
        from envs import Split, get_task
        from policy.scoring import completion_text
        from policy.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(model_dir)
        self.task, self.split = get_task("addition"), Split.TRAIN
        self.text = functools.lru_cache(maxsize=64)(lambda tokens: completion_text(tokenizer, list(tokens)))

    def __call__(self, prompt_index: int, tokens: tuple[int, ...]) -> float:
        return self.task.reward(self.task.problem(self.split, 0, prompt_index), self.text(tokens))


class Work:
    """A node's batch for a lease: per prompt, G samples of 64–256 tokens with log-probabilities and
    activation commitments, rightly scored. Samples are built once per length and reward and
    copied into each batch, so a simulator process keeps up with thousands of nodes."""

    def __init__(self, reward_of: RewardOf, rng: random.Random):
        self.reward_of = reward_of
        self.rng = rng
        self._samples: dict[tuple[int, float, int], list] = {}

    def _group_samples(self, num_tokens: int, reward: float, group_size: int) -> list:
        from protocol import commitment, convert
        from protocol.types import FinishReason, Rollout

        key = (num_tokens, reward, group_size)
        if key not in self._samples:
            self._samples[key] = [
                convert.rollout_to_proto(
                    Rollout(
                        sample_index=sample,
                        token_ids=self.tokens(num_tokens),
                        sampled_mask=(True,) * num_tokens,
                        logprobs=(-0.5,) * num_tokens,
                        commitment=bytes(commitment.PROOF_BYTES * -(-num_tokens // commitment.CHUNK_TOKENS)),
                        finish_reason=FinishReason.LENGTH,
                        claimed_reward=reward,
                    )
                )
                for sample in range(group_size)
            ]
        return self._samples[key]

    @staticmethod
    def tokens(num_tokens: int) -> tuple[int, ...]:
        return tuple(10 + (i * 7) % 80 for i in range(num_tokens))

    def payload(self, lease) -> bytes:
        from protocol.proto import rollout_pb2

        batch = rollout_pb2.RolloutBatch(lease_id=lease.lease_id, policy_version=lease.policy_version, engine="bench")
        for prompt in lease.prompts:
            num_tokens = self.rng.choice(range(NUM_TOKENS[0], NUM_TOKENS[1] + 1, 32))
            reward = self.reward_of(prompt.prompt_index, self.tokens(num_tokens))
            group = batch.groups.add(prompt_index=prompt.prompt_index)
            group.rollouts.extend(self._group_samples(num_tokens, reward, lease.group_size))
        return batch.SerializeToString()


@dataclass
class Tally:
    """Requests of one kind: latencies (ms), bytes sent and received, failures."""

    latencies_ms: list[float] = field(default_factory=list)
    bytes_sent: int = 0
    bytes_received: int = 0
    num_failed: int = 0
    first_failure: str = ""

    def add(self, other: Tally) -> None:
        self.latencies_ms += other.latencies_ms
        self.bytes_sent += other.bytes_sent
        self.bytes_received += other.bytes_received
        self.num_failed += other.num_failed
        self.first_failure = self.first_failure or other.first_failure


class Simulator:
    """The nodes of one simulator process."""

    def __init__(self, address: str, model_dir: Path, seed: int):
        import grpc

        from protocol.channel import DEFAULT_MAX_MESSAGE_BYTES, channel_options
        from protocol.proto import service_pb2_grpc

        self.rng = random.Random(seed)
        self.work = Work(RewardOf(model_dir), self.rng)
        # Channels to one address share one connection unless each keeps its own subchannels; a
        # connection is what SO_REUSEPORT hands to a replica, and every real node has its own.
        options = channel_options(DEFAULT_MAX_MESSAGE_BYTES) + [("grpc.use_local_subchannel_pool", 1)]
        self.channels = [grpc.aio.insecure_channel(address, options=options) for _ in range(CHANNELS_PER_SIMULATOR)]
        self.stubs = [service_pb2_grpc.NodeServiceStub(channel) for channel in self.channels]
        self.identities: list = []
        self.held: list[list] = []  # per node, leases taken by `leases` and not yet closed
        self.tallies: dict[str, Tally] = {}
        self.counting = False

    async def call(self, node: int, kind: str, method: str, payload: bytes):
        from protocol.envelope import method_name, seal

        envelope = seal(self.identities[node], method_name("NodeService", method), payload)
        rpc = getattr(self.stubs[node % len(self.stubs)], method)
        started = time.perf_counter()
        try:
            reply = await rpc(envelope, timeout=60)
        except Exception as error:
            if self.counting:
                tally = self.tallies.setdefault(kind, Tally())
                tally.num_failed += 1
                tally.first_failure = tally.first_failure or f"{kind}: {error}"[:300]
            raise
        if self.counting:
            tally = self.tallies.setdefault(kind, Tally())
            tally.latencies_ms.append(1000 * (time.perf_counter() - started))
            tally.bytes_sent += envelope.ByteSize()
            tally.bytes_received += reply.ByteSize()
        return reply

    def take_tallies(self) -> dict[str, Tally]:
        tallies, self.tallies = self.tallies, {}
        return tallies

    async def register(self, num_nodes: int) -> None:
        from protocol.identity import Identity
        from protocol.proto import service_pb2

        request = service_pb2.RegisterRequest(display_name="fleet", engine="bench").SerializeToString()
        while len(self.identities) < num_nodes:
            first = len(self.identities)
            self.identities += [Identity.generate() for _ in range(min(100, num_nodes - first))]
            self.held += [[] for _ in range(len(self.identities) - first)]
            await asyncio.gather(
                *(self.call(node, "register", "Register", request) for node in range(first, len(self.identities)))
            )

    async def lease(self, node: int):
        from protocol.proto import service_pb2

        request = service_pb2.LeaseRequest(policy_version=1).SerializeToString()
        return await self.call(node, "lease", "LeaseWork", request)

    # one request kind at a time

    async def each(self, num_nodes: int, kind: str, count: int) -> None:
        """count requests of one kind per node, each node's one after another."""
        from protocol.proto import service_pb2

        async def heartbeats(node: int) -> None:
            request = service_pb2.HeartbeatRequest(policy_version=1).SerializeToString()
            for _ in range(count):
                await self.call(node, "heartbeat", "Heartbeat", request)

        async def leases(node: int) -> None:
            for _ in range(count):
                reply = await self.lease(node)
                if reply.HasField("lease"):
                    self.held[node].append(reply.lease)

        async def submits(node: int) -> None:
            payloads = [self.work.payload(lease) for lease in self.held[node]]
            self.held[node] = []
            for payload in payloads:
                await self.call(node, "submit", "SubmitRollouts", payload)

        async def releases(node: int) -> None:
            leases, self.held[node] = self.held[node], []
            for lease in leases:
                request = service_pb2.ReleaseLeaseRequest(lease_id=lease.lease_id).SerializeToString()
                await self.call(node, "release", "ReleaseLease", request)

        work = {"heartbeat": heartbeats, "lease": leases, "submit": submits, "release": releases}[kind]
        self.counting = True
        await asyncio.gather(*(work(node) for node in range(num_nodes)), return_exceptions=True)
        self.counting = False

    # the realistic cycle

    async def cycle(self, num_nodes: int, time_scale: float, measure_s: float) -> None:
        """Run num_nodes nodes through their cycle for one work period, then count for measure_s."""
        from protocol.proto import service_pb2

        heartbeat = service_pb2.HeartbeatRequest(policy_version=1).SerializeToString()

        async def beat(node: int) -> None:
            await asyncio.sleep(self.rng.uniform(0, HEARTBEAT_S / time_scale))
            while True:
                next_at = time.monotonic() + HEARTBEAT_S / time_scale
                await self.call(node, "heartbeat", "Heartbeat", heartbeat)
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))

        async def work(node: int) -> None:
            await asyncio.sleep(self.rng.uniform(0, WORK_S[1] / time_scale))
            while True:
                reply = await self.lease(node)
                if not reply.HasField("lease"):
                    await asyncio.sleep(max(0.05, reply.retry_after_ms / 1000))
                    continue
                payload = self.work.payload(reply.lease)
                await asyncio.sleep(self.rng.uniform(*WORK_S) / time_scale)
                await self.call(node, "submit", "SubmitRollouts", payload)

        async def guarded(coroutine) -> None:
            with contextlib.suppress(Exception):  # counted as a failure; the node stops
                await coroutine

        tasks = [asyncio.create_task(guarded(job(node))) for node in range(num_nodes) for job in (beat, work)]
        await asyncio.sleep(WORK_S[1] / time_scale)
        self.counting = True
        await asyncio.sleep(measure_s)
        self.counting = False
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for node in range(num_nodes):
            self.held[node] = []


def simulator_main(connection, address: str, model_dir: Path, seed: int) -> None:
    """A simulator process: runs the commands its parent sends, answers each with the tallies."""

    async def serve() -> None:
        simulator = Simulator(address, model_dir, seed)
        loop = asyncio.get_running_loop()
        while True:
            command, *args = await loop.run_in_executor(None, connection.recv)
            if command == "close":
                break
            await getattr(simulator, command)(*args)
            connection.send(simulator.take_tallies())
        for channel in simulator.channels:
            await channel.close()

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    asyncio.run(serve())


class Simulators:
    """Simulator processes, each with its share of the nodes."""

    def __init__(self, count: int, address: str, model_dir: Path):
        context = multiprocessing.get_context("spawn")
        self.connections = []
        self.processes = []
        for index in range(count):
            parent, child = context.Pipe()
            process = context.Process(target=simulator_main, args=(child, address, model_dir, index), daemon=True)
            process.start()
            self.connections.append(parent)
            self.processes.append(process)

    def shares(self, num_nodes: int) -> list[int]:
        count = len(self.connections)
        return [num_nodes // count + (index < num_nodes % count) for index in range(count)]

    def run(self, command: str, num_nodes: int, *args) -> dict[str, Tally]:
        for connection, share in zip(self.connections, self.shares(num_nodes), strict=True):
            connection.send((command, share, *args))
        total: dict[str, Tally] = {}
        for connection in self.connections:
            for kind, tally in connection.recv().items():
                total.setdefault(kind, Tally()).add(tally)
        return total

    def close(self) -> None:
        for connection in self.connections:
            connection.send(("close",))
        for process in self.processes:
            process.join(timeout=30)


# ---- the coordinator side ----


class Database:
    """A fresh PostgreSQL database, dropped on close; its server's CPU and commits, as seen from here."""

    def __init__(self):
        import psycopg

        self.name = f"rp_fleet_{secrets.token_hex(4)}"
        self.admin = psycopg.connect(POSTGRES_CONNINFO, autocommit=True)
        self.admin.execute(f"CREATE DATABASE {self.name}")
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{self.name}"

    def server_cpu_seconds(self) -> float:
        """The CPU the PostgreSQL server has spent: its processes', and (the postmaster's children's
        times) that of the backends that have exited, which the pools' spare connections do."""
        backend = self.admin.execute("SELECT pg_backend_pid()").fetchone()[0]
        postmaster = int(Path(f"/proc/{backend}/stat").read_text().rpartition(")")[2].split()[1])
        fields = Path(f"/proc/{postmaster}/stat").read_text().rpartition(")")[2].split()
        exited = (int(fields[13]) + int(fields[14])) / CLOCK_TICKS  # cutime, cstime
        return exited + cpu_seconds(process_tree(postmaster))

    def writes(self) -> tuple[int, int]:
        """(transactions committed, reads included; rows inserted, updated and deleted) in the database
        so far, as the server's statistics say."""
        self.admin.execute("SELECT pg_stat_clear_snapshot()")
        row = self.admin.execute(
            "SELECT xact_commit, tup_inserted + tup_updated + tup_deleted FROM pg_stat_database WHERE datname = %s",
            (self.name,),
        ).fetchone()
        return row[0], row[1]

    def settled_writes(self, max_wait_s: float = 30.0) -> tuple[int, int]:
        """writes() once the rows written stop changing: the server's backends report within a second
        under load and up to 10 s after going idle. Transactions never stop (the coordinator's
        housekeeping commits a few each second), so only rows are waited for."""
        previous = self.writes()
        deadline = time.monotonic() + max_wait_s
        while time.monotonic() < deadline:
            time.sleep(2.0)
            current = self.writes()
            if current[1] == previous[1]:
                return current
            previous = current
        return previous

    def close(self) -> None:
        self.admin.execute(f"DROP DATABASE {self.name} WITH (FORCE)")
        self.admin.close()


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLOCK_TICKS


def process_tree(pid: int) -> list[int]:
    pids = [pid]
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # it exited meanwhile
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            pids += process_tree(int(child))
    return pids


class Coordinator:
    """`rollproof coordinator serve` on a fresh database: one process, or `--processes N`."""

    def __init__(self, root: Path, model_dir: Path, trainer, num_replicas: int, database: Database):
        self.log_path = root / f"coordinator-{num_replicas}.log"
        self.port = free_port()
        data_dir = root / f"coordinator-{num_replicas}"
        settings = (
            f"store.url={database.url}",
            "validation.enabled=false",
            f"run.prompts_per_lease={PROMPTS_PER_LEASE}",
            f"run.group_size={GROUP_SIZE}",
            f"run.sampling.max_tokens={NUM_TOKENS[1]}",
            "run.max_backlog_groups=0",
            "lease.max_open_per_node=64",
            "lease.walkaway_window=1000",
            "lease.max_walkaway_fraction=0.9",
            "server.registration_burst_per_address=1000000",
            "server.unauthenticated_request_burst_per_address=1000000",
        )
        publish_version_one(data_dir, model_dir, trainer)
        command = [sys.executable, "-m", "rollproof.cli", "--log-level", "WARNING", "coordinator", "serve"]
        command += ["--data-dir", str(data_dir), "--model", str(model_dir), "--grpc-port", str(self.port)]
        command += ["--http-port", "0", "--trainer-key-fingerprint", trainer.key_id]
        command += [item for setting in settings for item in ("--set", setting)]
        if num_replicas > 1:
            command += ["--processes", str(num_replicas)]
        self.num_replicas = num_replicas
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 180
        while self.log_path.read_text(errors="replace").count("coordinator grpc=") < self.num_replicas:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the coordinator did not start:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.2)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def pids(self) -> list[int]:
        return process_tree(self.process.pid)

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def publish_version_one(data_dir: Path, model_dir: Path, trainer) -> None:
    from coordinator.blobstore import BlobStore
    from policy.model import load_model
    from trainer.publish import PolicyPublisher

    blobs = BlobStore(data_dir / "policy", run_id="demo", trainer_public_key=trainer.public_key)
    PolicyPublisher(trainer, "demo", blobs).publish_model(1, load_model(model_dir))


# ---- measurements ----


@dataclass
class KindCost:
    num_requests: int
    coordinator_cpu_ms: float
    postgres_cpu_ms: float
    bytes_sent: float
    bytes_received: float
    commits: float
    rows_written: float
    p99_ms: float


def cost_per_kind(
    simulators: Simulators, coordinator: Coordinator, database: Database, num_nodes: int, count: int, settle: bool
):
    """Each request kind alone: the CPU it costs the coordinator and PostgreSQL, its bytes and (settle:
    waiting for the server's statistics) its transactions, less those of the coordinator's
    housekeeping measured while idle, and rows written."""
    background_commits_per_s = 0.0
    if settle:
        before = database.settled_writes()
        started = time.monotonic()
        time.sleep(10.0)
        background_commits_per_s = (database.writes()[0] - before[0]) / (time.monotonic() - started)
    costs: dict[str, KindCost] = {}
    for kind in KINDS:
        if kind == "release":
            simulators.run("each", num_nodes, "lease", count)  # leases to release
        coordinator_pids = coordinator.pids()
        writes_before = database.settled_writes() if settle else database.writes()
        started = time.monotonic()
        cpu_before = cpu_seconds(coordinator_pids), database.server_cpu_seconds()
        tally = simulators.run("each", num_nodes, kind, count)[kind]
        cpu_after = cpu_seconds(coordinator_pids), database.server_cpu_seconds()
        writes_after = database.settled_writes() if settle else database.writes()
        num = max(1, len(tally.latencies_ms))
        background_commits = background_commits_per_s * (time.monotonic() - started)
        costs[kind] = KindCost(
            num_requests=len(tally.latencies_ms),
            coordinator_cpu_ms=1000 * (cpu_after[0] - cpu_before[0]) / num,
            postgres_cpu_ms=1000 * (cpu_after[1] - cpu_before[1]) / num,
            bytes_sent=tally.bytes_sent / num,
            bytes_received=tally.bytes_received / num,
            commits=(writes_after[0] - writes_before[0] - background_commits) / num,
            rows_written=(writes_after[1] - writes_before[1]) / num,
            p99_ms=p99(tally.latencies_ms),
        )
        if tally.num_failed:
            print(f"  {kind}: {tally.num_failed} failed, first: {tally.first_failure}")
    return costs


@dataclass
class Level:
    num_nodes: int  # real-node equivalents
    requests_per_s: float
    p99_ms: float
    p99_by_kind: dict[str, float]
    num_failed: int
    first_failure: str
    commits_per_s: float
    rows_per_s: float
    cpu_cores: float  # the coordinators' CPU, in cores
    postgres_cores: float
    simulator_cores: float


def climb(args, simulators: Simulators, coordinator: Coordinator, database: Database, ladder: list[int]):
    """The ladder's levels in turn until one passes the p99 target or fails requests."""
    levels = []
    for num_nodes in ladder:
        num_simulated = max(1, round(num_nodes / args.time_scale))
        simulators.run("register", num_simulated)
        pids = coordinator.pids()
        simulator_pids = [process.pid for process in simulators.processes]
        started, writes_before = time.monotonic(), database.writes()
        cpu_before = cpu_seconds(pids), database.server_cpu_seconds(), cpu_seconds(simulator_pids)
        tallies = simulators.run("cycle", num_simulated, args.time_scale, args.measure_s)
        elapsed = time.monotonic() - started
        writes_after = database.writes()
        cpu_after = cpu_seconds(pids), database.server_cpu_seconds(), cpu_seconds(simulator_pids)
        latencies = [value for tally in tallies.values() for value in tally.latencies_ms]
        failures = [tally for tally in tallies.values() if tally.num_failed]
        level = Level(
            num_nodes=num_nodes,
            requests_per_s=len(latencies) / args.measure_s,
            p99_ms=p99(latencies),
            p99_by_kind={kind: p99(tally.latencies_ms) for kind, tally in sorted(tallies.items())},
            num_failed=sum(tally.num_failed for tally in tallies.values()),
            first_failure=failures[0].first_failure if failures else "",
            commits_per_s=(writes_after[0] - writes_before[0]) / elapsed,
            rows_per_s=(writes_after[1] - writes_before[1]) / elapsed,
            cpu_cores=(cpu_after[0] - cpu_before[0]) / elapsed,
            postgres_cores=(cpu_after[1] - cpu_before[1]) / elapsed,
            simulator_cores=(cpu_after[2] - cpu_before[2]) / elapsed,
        )
        levels.append(level)
        kinds = ", ".join(f"{kind} {value:.0f}" for kind, value in level.p99_by_kind.items())
        print(
            f"  {num_nodes:>7} nodes ({num_simulated} simulated): {level.requests_per_s:6.0f} requests/s, "
            f"p99 {level.p99_ms:6.0f} ms ({kinds}), {level.num_failed} failed, coordinator "
            f"{level.cpu_cores:.2f} cores, PostgreSQL {level.postgres_cores:.2f} cores, simulators "
            f"{level.simulator_cores:.2f} cores, "
            f"{level.commits_per_s:.0f} commits/s, {level.rows_per_s:.0f} rows/s",
            flush=True,
        )
        if level.first_failure:
            print(f"    first failure: {level.first_failure}")
        if level.p99_ms > P99_TARGET_MS or level.num_failed:
            break
    return levels


def largest_within(levels: list[Level]) -> int:
    passed = [level.num_nodes for level in levels if level.p99_ms <= P99_TARGET_MS and not level.num_failed]
    return max(passed, default=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a short ladder and short windows (under a minute)")
    parser.add_argument("--time-scale", type=float, help="cycle speed-up: one simulated node stands for this many")
    parser.add_argument("--measure-s", type=float, help="seconds counted per ladder level")
    parser.add_argument("--ladder", help="node counts (real-node equivalents), comma-separated")
    parser.add_argument("--simulators", type=int, default=2, help="simulator processes")
    parser.add_argument("--replicas", default="1,2", help="replica counts to measure, comma-separated")
    args = parser.parse_args()
    if args.quick:
        args.time_scale = args.time_scale or 30.0
        args.measure_s = args.measure_s or 4.0
        ladder = [int(n) for n in (args.ladder or "1500,3000,6000").split(",")]
    else:
        args.time_scale = args.time_scale or 10.0
        args.measure_s = args.measure_s or 15.0
        ladder = [int(n) for n in (args.ladder or "1000,2000,3000,4000,5000,6000,8000,10000,12000").split(",")]

    from policy.model import create_tiny_model
    from protocol.identity import Identity

    print(f"load before: {uptime()}", flush=True)
    results: dict[int, list[Level]] = {}
    costs: dict[str, KindCost] = {}
    with tempfile.TemporaryDirectory(prefix="rollproof-fleet-") as temporary:
        root = Path(temporary)
        model_dir = root / "model"
        create_tiny_model(model_dir)
        trainer = Identity.generate()
        setups = []  # every coordinator and its simulators start at once, and are measured in turn
        try:
            for num_replicas in (int(n) for n in args.replicas.split(",")):
                database = Database()
                setups.append((database, Coordinator(root, model_dir, trainer, num_replicas, database)))
            simulators = [Simulators(args.simulators, coordinator.address, model_dir) for _, coordinator in setups]
            for (database, coordinator), simulator in zip(setups, simulators, strict=True):
                coordinator.wait_ready()
                print(f"{coordinator.num_replicas} replica(s) on PostgreSQL, time scale {args.time_scale:g}:")
                if not costs:
                    num_nodes, count = (40, 2) if args.quick else (200, 10)
                    simulator.run("register", num_nodes)
                    costs = cost_per_kind(simulator, coordinator, database, num_nodes, count, settle=not args.quick)
                    for kind, cost in costs.items():
                        print(
                            f"  {kind}: {cost.coordinator_cpu_ms:.2f} CPU-ms coordinator, {cost.postgres_cpu_ms:.2f} "
                            f"CPU-ms PostgreSQL, {cost.bytes_sent:.0f} B in, {cost.bytes_received:.0f} B out"
                            + (
                                ""
                                if args.quick
                                else f", {cost.commits:.2f} transactions, {cost.rows_written:.1f} rows written"
                            )
                            + f" ({cost.num_requests} requests, p99 {cost.p99_ms:.0f} ms)",
                            flush=True,
                        )
                results[coordinator.num_replicas] = climb(args, simulator, coordinator, database, ladder)
                simulator.close()
                coordinator.stop()
        finally:
            for database, coordinator in setups:
                if coordinator.process.poll() is None:
                    coordinator.stop()
                database.close()
    print(f"load after: {uptime()}")
    for kind, cost in costs.items():
        print(f"cpu-ms-per-{kind}: {cost.coordinator_cpu_ms:.2f} (coordinator; PostgreSQL {cost.postgres_cpu_ms:.2f})")
    at = {num_replicas: largest_within(levels) for num_replicas, levels in results.items()}
    for num_replicas, num_nodes in at.items():
        print(
            f"fleet-nodes-at-p99-250ms-{num_replicas}-replica{'s' if num_replicas > 1 else ''}: {num_nodes} "
            f"(target: ≥ 5000 with 2 replicas)"
        )
    if at.get(1) and 2 in at:
        print(f"replica-scaling-ratio: {at[2] / at[1]:.2f} (target: ≥ 1.6)")


if __name__ == "__main__":
    main()
