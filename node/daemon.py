"""The worker daemon: register, heartbeat, follow the policy, lease, generate, score,
spool, submit. One asyncio loop; generation runs in a worker thread so heartbeats go on."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc

from envs import get_task
from node.client import CoordinatorClient
from node.config import NodeConfig
from node.spool import Spool
from protocol import convert
from protocol.identity import key_id, load_role_identity
from protocol.proto import rollout_pb2, service_pb2
from protocol.retry import call_with_retry_async, transient_status
from protocol.types import WorkLease

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"
STANDING_INTERVAL_S = 60.0
TRAINER_PIN_FILE = "trainer_key_fingerprint"


class _Stopping(Exception):
    """The daemon was asked to stop while the coordinator could not be reached."""


class TrainerKeyError(ValueError):
    """The coordinator's trainer key is not the one this node was told to trust."""


@dataclass
class NodeStatus:
    node_id: str = ""
    coordinator: str = ""
    link: str = "connecting"
    policy_version: int = 0
    tokens_per_second: float = 0.0
    num_tokens_generated: int = 0
    num_rollouts_accepted: int = 0
    num_rollouts_rejected: int = 0
    num_batches_spooled: int = 0
    last_rejection: str = ""
    last_error: str = ""
    waiting_for: str = ""  # why the coordinator gave no lease the last time it gave none
    updated_ms: int = field(default_factory=lambda: time.time_ns() // 1_000_000)
    # its standing in the run, as the coordinator last told it (every STANDING_INTERVAL_S)
    rank: int = 0
    num_nodes: int = 0
    reputation: float = 0.0
    num_strikes: int = 0
    on_probation: bool = False
    ban_reason: str = ""
    settled_tokens: int = 0
    pending_tokens: int = 0
    voided_tokens: int = 0
    pending_settles_ms: int = 0
    last_rejection_reason: str = ""
    last_rejection_remedy: str = ""
    dashboard_url: str = ""


def read_status(state_dir: Path) -> NodeStatus:
    path = Path(state_dir).expanduser() / STATUS_FILE
    try:
        return NodeStatus(**json.loads(path.read_text()))
    except FileNotFoundError:
        raise ValueError(f"no node status at {path}: is a node running with state_dir {state_dir}?") from None


class CoordinatorRefusedError(ValueError):
    """The coordinator answered a request with an error that retrying cannot fix (the node's
    registration, key or request is refused); the node stops and says why."""


class NodeDaemon:
    def __init__(self, config: NodeConfig, *, model_dir: Path, accept_trainer_key: bool = False):
        self.config = config
        self.model_dir = Path(model_dir).expanduser()
        self.accept_trainer_key = accept_trainer_key
        self.state_dir = config.state_dir.expanduser()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.identity, created = load_role_identity(config.key_file, self.state_dir / "node.key")
        if created:
            log.warning(
                "created a new node key %s (node id %s): it is this node's identity and holds its credit; "
                "back it up, and pass it with --key-file when you move the node",
                self.state_dir / "node.key",
                self.identity.key_id,
            )
        self.spool = Spool(self.state_dir / "spool")
        self.status = NodeStatus(node_id=self.identity.key_id, coordinator=config.coordinator)
        self.stop_event = asyncio.Event()
        self.wake = asyncio.Event()  # a verified announcement of a new policy version arrived
        self.peers = None

    # ---- plumbing ----

    def _write_status(self) -> None:
        self.status.num_batches_spooled = len(self.spool)
        self.status.updated_ms = time.time_ns() // 1_000_000
        path = self.state_dir / STATUS_FILE
        temp = path.with_suffix(".tmp")
        temp.write_text(json.dumps(asdict(self.status)))
        temp.replace(path)

    async def _call(self, what: str, make_call, on_first_failure=None):
        """Run an RPC under the retry policy (protocol/retry.py) while the link is down; a stop
        while it is down raises _Stopping."""
        num_failures = 0

        def reconnecting(error: grpc.aio.AioRpcError) -> None:
            nonlocal num_failures
            num_failures += 1
            if num_failures == 1 and on_first_failure is not None:
                on_first_failure(error)
            self.status.link = "reconnecting"
            self.status.last_error = f"{what}: {error.code().name}: {error.details()}"
            self._write_status()

        try:
            result = await call_with_retry_async(
                make_call, address=self.config.coordinator, what=what, stop=self.stop_event, on_retry=reconnecting
            )
        except grpc.aio.AioRpcError as error:
            if transient_status(error) and self.stop_event.is_set():
                raise _Stopping(f"{what}: {error.code().name}") from None
            raise
        if self.status.link != "connected":
            self.status.link = "connected"
            self._write_status()
        return result

    def _explain_unreachable(self, error: grpc.aio.AioRpcError) -> None:
        log.error(
            "no coordinator answers at %s (%s: %s). Check --coordinator: it is the gRPC address that "
            "`rollproof coordinator serve` prints as grpc=HOST:PORT (the HTTP port of the dashboard does not "
            "speak gRPC). Retrying until it answers; Ctrl-C stops.",
            self.config.coordinator,
            error.code().name,
            error.details(),
        )

    def _pinned_fingerprint(self, offered: str) -> str:
        pin_file = self.state_dir / TRAINER_PIN_FILE
        pinned = self.config.trainer_key_fingerprint or (pin_file.read_text().strip() if pin_file.exists() else "")
        if not pinned:
            if not self.accept_trainer_key:
                raise TrainerKeyError(
                    f"no trainer key is pinned. The coordinator offers {offered}; if that is the fingerprint the "
                    "operator published, set trainer_key_fingerprint in the node config or run once with "
                    "--accept-trainer-key"
                )
            pin_file.write_text(offered + "\n")
            log.warning("pinned trainer key %s on first contact (%s)", offered, pin_file)
            return offered
        if pinned != offered:
            raise TrainerKeyError(
                f"the coordinator's trainer key is {offered}, but this node trusts only {pinned}: refusing its policies"
            )
        return pinned

    # ---- lifecycle ----

    async def run(self) -> None:
        import torch

        from node.generate import build_engine
        from node.policy_sync import PolicySync
        from policy.model import freeze_long_lived_objects
        from policy.tokenizer import load_tokenizer

        torch.set_num_threads(self.config.engine.threads)
        if self.config.metrics_port:
            from node.metrics import serve_metrics

            serve_metrics(self.config.metrics_port, lambda: self.status)
        client = CoordinatorClient(self.config.coordinator, self.identity, tls=self.config.coordinator_tls)
        try:
            run_info = await self._call("run info", client.run_info, on_first_failure=self._explain_unreachable)
            self._pinned_fingerprint(key_id(run_info.trainer_public_key))
            self.task = get_task(run_info.task)
            self.run_info = run_info
            self.tokenizer = load_tokenizer(self.model_dir)
            self.engine, model, engine_name = build_engine(
                self.config.engine, self.model_dir, {run_info.eos_token_id}, self.tokenizer.pad_token_id or 0
            )
            self.peers = self._start_peers(run_info)
            self.policy = PolicySync(model, client, run_info, self.peers)
            freeze_long_lived_objects()
            if self.config.engine.kind == "vllm":
                self.engine.follow(self.policy.node_policy)
            response = await self._call(
                "register",
                lambda: client.register(
                    service_pb2.RegisterRequest(
                        display_name=self.config.display_name,
                        engine=engine_name,
                        hardware=f"{self.config.engine.device} x{self.config.engine.threads}",
                        software_version=_software_version(),
                    )
                ),
            )
            log.info("registered as node %s with %s", response.node_id, self.config.coordinator)
            print(f"node id: {response.node_id}", flush=True)
            self.engine_name = engine_name
            heartbeat = asyncio.create_task(self._heartbeats(client, response.heartbeat_interval_ms / 1000))
            try:
                await self._resend_spool(client)
                await self._work(client)
            finally:
                heartbeat.cancel()
                if self.peers is not None:
                    await asyncio.to_thread(self.peers.stop)
        except _Stopping as stopping:
            log.warning(
                "stopping while the coordinator is unreachable (%s); %d spooled batches will be re-sent on restart",
                stopping,
                len(self.spool),
            )
        except grpc.aio.AioRpcError as error:
            raise CoordinatorRefusedError(
                f"the coordinator refused a request ({error.code().name}): {error.details()}"
            ) from None
        finally:
            self.status.link = "stopped"
            self._write_status()
            await client.close()

    def _start_peers(self, run_info):
        """The node's libp2p host (peer id = node id) when p2p is enabled and the run has a seed."""
        if not self.config.p2p.enabled:
            return None
        from node.policy_sync import BlobCache
        from p2p import P2PHost, P2PSettings
        from protocol.manifest import signed_manifest_from_bytes, verify_manifest

        bootstrap = list(self.config.p2p.bootstrap) or list(run_info.p2p_bootstrap)
        if not bootstrap:
            log.warning("p2p is enabled but neither the config nor the coordinator names a seed peer; origin only")
            return None
        cache = BlobCache(self.config.p2p.cache_bytes)
        loop = asyncio.get_running_loop()
        host = P2PHost(
            self.identity,
            run_info.run_id,
            P2PSettings.from_config(self.config.p2p),
            blob_source=cache.get,
            blob_sink=cache.put,
            verify_manifest=lambda data: verify_manifest(signed_manifest_from_bytes(data), run_info.trainer_public_key),
            bootstrap=bootstrap,
            on_announcement=lambda data, manifest, peer: loop.call_soon_threadsafe(self.wake.set),
        )
        host.start()
        log.info("peer host %s on %s", host.peer_id, ", ".join(host.addrs))
        return host

    async def _heartbeats(self, client: CoordinatorClient, interval_s: float) -> None:
        standing_due = 0.0
        while True:
            try:
                await client.heartbeat(
                    service_pb2.HeartbeatRequest(
                        policy_version=self.status.policy_version,
                        tokens_per_second=self.status.tokens_per_second,
                    )
                )
                self.status.link = "connected"
                if time.monotonic() >= standing_due:
                    self._take_standing(await client.standing())
                    standing_due = time.monotonic() + STANDING_INTERVAL_S
            except grpc.aio.AioRpcError as error:
                self.status.link = "reconnecting"
                self.status.last_error = f"heartbeat: {error.code().name}: {error.details()}"
            self._write_status()
            await asyncio.sleep(interval_s)

    def _take_standing(self, standing: service_pb2.NodeStanding) -> None:
        status = self.status
        status.rank, status.num_nodes = standing.rank, standing.num_nodes
        status.reputation, status.num_strikes = standing.reputation, standing.num_strikes
        status.on_probation, status.ban_reason = standing.on_probation, standing.ban_reason
        status.settled_tokens, status.pending_tokens = standing.settled_tokens, standing.pending_tokens
        status.voided_tokens, status.pending_settles_ms = standing.voided_tokens, standing.pending_settles_ms
        if standing.last_rejection_reason:  # the coordinator's newest, full checks included
            status.last_rejection = standing.last_rejection_message
            status.last_rejection_reason = standing.last_rejection_reason
            status.last_rejection_remedy = standing.last_rejection_remedy
        status.dashboard_url = standing.dashboard_url

    async def _resend_spool(self, client: CoordinatorClient) -> None:
        for batch in self.spool.pending():
            log.info("re-sending spooled batch %s", batch.batch_hash[:16])
            receipt = await self._call("submit", functools.partial(client.submit, batch.payload))
            self._count_receipt(receipt)
            self.spool.remove(batch)
        self._write_status()

    async def _work(self, client: CoordinatorClient) -> None:
        while not self.stop_event.is_set():
            await self.policy.sync(self._call)
            self.status.policy_version = self.policy.version
            reply = await self._call("lease", lambda: client.lease(self.policy.version))
            if not reply.HasField("lease"):
                self.status.waiting_for = reply.wait_reason
                await self._pause(reply.retry_after_ms / 1000)
                continue
            self.status.waiting_for = ""
            lease = convert.lease_from_proto(reply.lease)
            if self.stop_event.is_set():
                await client.release(lease.lease_id)
                break
            payload = await asyncio.to_thread(self._generate, lease)
            spooled = self.spool.put(payload)
            receipt = await self._call("submit", functools.partial(client.submit, payload))
            self._count_receipt(receipt)
            self.spool.remove(spooled)
            self._write_status()

    async def _pause(self, seconds: float) -> None:
        """Wait until the retry time, a stop, or the announcement of a new version."""
        self.wake.clear()
        waits = [asyncio.create_task(self.stop_event.wait()), asyncio.create_task(self.wake.wait())]
        await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        for task in waits:
            task.cancel()

    def _count_receipt(self, receipt: rollout_pb2.Receipt) -> None:
        self.status.num_rollouts_accepted += receipt.num_accepted
        self.status.num_rollouts_rejected += receipt.num_rejected
        rejected = [v for v in receipt.verdicts if not v.accepted]
        if rejected:
            self.status.last_rejection = rejected[0].message
            log.warning("%d rollouts rejected: %s", len(rejected), rejected[0].message)

    def _generate(self, lease: WorkLease) -> bytes:
        from node.generate import generate_batch

        started = time.perf_counter()
        generated = generate_batch(
            self.engine, self.tokenizer, self.task, self.run_info.run_seed, lease, self.engine_name
        )
        elapsed = time.perf_counter() - started
        self.status.num_tokens_generated += generated.num_tokens
        rate = generated.num_tokens / elapsed if elapsed > 0 else 0.0
        self.status.tokens_per_second = (
            rate if not self.status.tokens_per_second else (0.7 * self.status.tokens_per_second + 0.3 * rate)
        )
        return convert.batch_to_proto(generated.batch).SerializeToString()


def _software_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"rollproof {version('rollproof')}"
    except PackageNotFoundError:
        return "rollproof (not installed)"
