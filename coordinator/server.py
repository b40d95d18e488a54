"""`rollproof coordinator serve`: build the coordinator from its config and run the gRPC
service, the HTTP server (blobs with Range, dashboard, JSON API, /metrics) and the housekeeping
loops until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc

from coordinator.blobstore import BlobStore
from coordinator.config import CoordinatorConfig
from coordinator.core import SETTLE_WINDOW_MS, Coordinator, RunSetup
from coordinator.gate import Gate, GateLimits
from coordinator.grpc_servicers import AdminServicer, GuardInterceptor, NodeServicer, TrainerServicer
from coordinator.policy_history import PolicyHistory
from coordinator.store import Store, open_store, sqlite_url
from coordinator.store.leadership import HousekeepingLock
from coordinator.transport import server_credentials
from coordinator.validation import GroupChecker, SamplingPolicy, ValidationQueue, Validator
from coordinator.validator_service import ValidatorServicer
from coordinator.versions import PolicyVersions
from protocol.envelope import EnvelopeVerifier
from protocol.identity import Identity, public_key_from_key_id
from protocol.proto import service_pb2_grpc, validation_pb2_grpc
from protocol.tls import is_loopback_host

log = logging.getLogger(__name__)

ENDPOINTS_FILE = "endpoints.json"
HOUSEKEEPING_INTERVAL_S = 1.0
VALIDATION_IDLE_S = 0.5


REPLICAS_NEED_POSTGRESQL = (
    "several coordinator processes need a store they can share: set store.url to a PostgreSQL database "
    "(postgresql+psycopg://USER@HOST/DB); the SQLite store serves one process"
)


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(text)
    partial.replace(path)


def trainer_key(config: CoordinatorConfig) -> bytes:
    if not config.trainer_key_fingerprint:
        raise ValueError(
            "trainer_key_fingerprint is not set: put the key id of the trainer's key "
            "(`rollproof keygen --out trainer.key` prints it) in the coordinator config"
        )
    try:
        return public_key_from_key_id(config.trainer_key_fingerprint)
    except ValueError as error:
        raise ValueError(f"trainer_key_fingerprint: {error}") from None


def model_directory(config: CoordinatorConfig) -> Path:
    from policy.model import check_model_directory

    if config.run.model is None:
        raise ValueError(
            "run.model is not set: point it at a Hugging Face model directory"
            " (`rollproof bootstrap` makes the default one)"
        )
    directory = config.run.model.expanduser()
    check_model_directory(directory)
    return directory


def count_parameters(directory: Path) -> int:
    """Parameters stored in a model directory's safetensors files, read from their headers."""
    from safetensors import safe_open

    total = 0
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="numpy") as weights:
            names = weights.keys()  # a safe_open handle is not iterable
            for name in names:
                shape = weights.get_slice(name).get_shape()
                count = 1
                for dim in shape:
                    count *= dim
                total += count
    return total


def load_run_setup(config: CoordinatorConfig) -> RunSetup:
    from transformers import AutoConfig

    from envs import get_task
    from envs.sandbox import SandboxSettings, configure_sandbox, default_max_concurrent
    from policy.tokenizer import load_tokenizer

    directory = model_directory(config)
    tokenizer = load_tokenizer(directory)
    model_config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer in {directory} has no EOS token")
    sandbox = config.sandbox
    configure_sandbox(
        SandboxSettings(sandbox.implementation, sandbox.max_concurrent or default_max_concurrent(), sandbox.max_queued)
    )
    return RunSetup(
        task=get_task(config.run.task),
        tokenizer=tokenizer,
        model_name=directory.name,
        vocab_size=model_config.vocab_size,
        eos_token_id=tokenizer.eos_token_id,
        num_parameters=count_parameters(directory),
        trainer_public_key=trainer_key(config),
    )


def open_coordinator_store(config: CoordinatorConfig) -> Store:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import OperationalError

    data_dir = config.data_dir.expanduser()
    data_dir.mkdir(parents=True, exist_ok=True)
    url = config.store.url or sqlite_url(data_dir)
    try:
        return open_store(url)
    except OperationalError as error:
        cause = str(error.orig or error).strip().splitlines()[0]
        shown = make_url(url).render_as_string(hide_password=True)
        raise ValueError(
            f"cannot open the store {shown}: {cause}. Check store.url (for PostgreSQL the database must exist: "
            "`createdb NAME`)"
        ) from None


def _bind_error(what: str, address: str, flag: str, cause: str) -> ValueError:
    return ValueError(
        f"cannot listen for {what} on {address} ({cause}): another process (another coordinator?) holds the "
        f"port, or the host is not an address of this machine; stop it, or pick a port with {flag} (0: any free one)"
    )


@dataclass
class Endpoints:
    grpc: str
    http: str
    p2p: list[str]


@dataclass
class Built:
    app: Coordinator
    gate: Gate
    validation: ValidationQueue | None  # None when validation is disabled
    validator: Validator | None  # the one inside the coordinator, when validation.in_process


def build(config: CoordinatorConfig, setup: RunSetup, store: Store, num_replicas: int = 1) -> Built:
    blobs = BlobStore(
        config.data_dir.expanduser() / "policy", run_id=config.run.run_id, trainer_public_key=setup.trainer_public_key
    )
    sampling_policy = SamplingPolicy(
        num_initial_checks=config.validation.num_initial_checks,
        floor_rate=config.validation.floor_rate,
        max_strikes=config.validation.max_strikes,
        probation_tokens=config.validation.probation_tokens,
    )
    app = Coordinator(
        config,
        store,
        setup,
        PolicyVersions(blobs, store, setup.trainer_public_key),
        needs_validation=sampling_policy.needs_validation if config.validation.enabled else None,
    )
    queue = validator = None
    if config.validation.enabled:
        queue = ValidationQueue(
            store, app.prompt, sampling_policy, clock=app.clock, lease_ms=round(config.validation.lease_s * 1000)
        )
    if queue is not None and config.validation.in_process:
        history = PolicyHistory(blobs, config.run.run_id, setup.trainer_public_key, config.run.max_staleness + 1)
        validator = Validator(queue, GroupChecker(history, model_directory(config), device=config.validation.device))
    gate = Gate(
        EnvelopeVerifier(window_ms=round(config.server.envelope_window_s * 1000)),
        GateLimits.from_config(config.server, num_replicas),
        store.get_node,
        setup.trainer_public_key,
        config.operator_token.get_secret_value(),
        # On PostgreSQL any other coordinator process on the store may be a replica behind the same address.
        take_nonce=None if store.database.is_sqlite else store.take_nonce,
    )
    return Built(app, gate, queue, validator)


async def _validation_loop(validator: Validator, lock: HousekeepingLock) -> None:
    """The embedded validator runs on the replica holding the housekeeping lock only, so no
    group is checked twice by the replicas' validators."""
    while True:
        if not await asyncio.to_thread(lock.held):
            await asyncio.sleep(HOUSEKEEPING_INTERVAL_S)
            continue
        try:
            num_decided = await asyncio.to_thread(validator.run_pending)
        except Exception:
            log.exception("validation failed; retrying")
            num_decided = 0
        if not num_decided:
            await asyncio.sleep(VALIDATION_IDLE_S)


def start_seed(config: CoordinatorConfig, app: Coordinator):
    """The seed peer beside the coordinator: announces every published version and serves its
    blobs to the peer network about once."""
    from coordinator.seed import SeedHost, blob_source_of, trainer_manifest_verifier
    from p2p import P2PSettings
    from protocol.manifest import signed_manifest_to_bytes

    seed = SeedHost(
        Identity.load_or_create(config.data_dir.expanduser() / "seed.key"),
        config.run.run_id,
        blob_source=blob_source_of(app.policy.blobs),
        verify_manifest=trainer_manifest_verifier(app.setup.trainer_public_key),
        settings=P2PSettings.from_config(config.p2p),
    )
    seed.start()
    app.p2p_bootstrap = tuple(seed.bootstrap_addrs)
    app.policy.on_publish.append(lambda signed: seed.publish_version(signed_manifest_to_bytes(signed)))
    if app.policy.blobs.latest_version() is not None:
        seed.publish_version(signed_manifest_to_bytes(app.policy.manifest(None)))
    log.info("seed peer %s on %s", seed.peer_id, ", ".join(seed.bootstrap_addrs))
    return seed


def _read_p2p_bootstrap(config: CoordinatorConfig, app: Coordinator) -> None:
    """A replica without the seed peer announces the seed's addresses, from the first replica's endpoints."""
    if config.p2p.enabled and not app.p2p_bootstrap:
        with contextlib.suppress(FileNotFoundError, ValueError, KeyError):
            endpoints = json.loads((config.data_dir.expanduser() / ENDPOINTS_FILE).read_text())
            app.p2p_bootstrap = tuple(endpoints["p2p"])


async def _housekeeping(config: CoordinatorConfig, app: Coordinator) -> None:
    """Every replica writes its own heartbeats and catches up with versions published through the
    others; the one holding the store's housekeeping lock also expires leases, settles credit and
    forgets expired nonces."""

    def expire_leases() -> None:
        expired = app.expire_leases()
        if expired:
            log.info("%d leases expired; their prompts are leased again", expired)

    every_replica = {
        "writing heartbeats": app.flush_heartbeats,
        "reading published versions": app.policy.refresh,
        "reading the seed peer's addresses": lambda: _read_p2p_bootstrap(config, app),
    }
    lock_holder = {
        "expiring leases": expire_leases,
        "settling contributions": lambda: app.store.settle_contributions(app.clock() - SETTLE_WINDOW_MS),
    }
    if not app.store.database.is_sqlite:
        lock_holder["forgetting expired nonces"] = lambda: app.store.forget_nonces(app.clock())
    while True:
        steps = dict(every_replica)
        if await asyncio.to_thread(app.store.housekeeping_lock.held):
            steps.update(lock_holder)
        for what, step in steps.items():  # each on its own: one failing holds up none of the others
            try:
                await asyncio.to_thread(step)
            except Exception:
                log.exception("%s failed; retrying", what)
        await asyncio.sleep(HOUSEKEEPING_INTERVAL_S)


def grpc_credentials(config: CoordinatorConfig) -> grpc.ServerCredentials | None:
    """TLS credentials of the gRPC side when server.tls_cert and server.tls_key are set, else None."""
    if config.server.tls_cert is not None and config.server.tls_key is not None:
        return server_credentials(config.server.tls_cert, config.server.tls_key)
    if not is_loopback_host(config.server.host):
        log.warning(
            "gRPC on %s is plaintext: nodes cannot check whom they talk to, and operator calls are "
            "refused from other machines; set server.tls_cert and server.tls_key",
            config.server.host,
        )
    return None


@dataclass(frozen=True)
class Replica:
    """One of `count` coordinator processes started together on one host (`--processes`): they
    share the gRPC and HTTP ports (SO_REUSEPORT: the kernel spreads connections over them), the
    store (PostgreSQL) and the data directory. Replica 0 runs the seed peer and writes endpoints.json."""

    index: int
    count: int


def _grpc_server(config: CoordinatorConfig, built: Built, replica: Replica | None) -> grpc.aio.Server:
    app, gate = built.app, built.gate
    server = grpc.aio.server(
        interceptors=[GuardInterceptor(gate, app.refusals, app.rpc_latency)],
        options=[
            ("grpc.max_receive_message_length", config.server.max_message_bytes),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            # Replicas share the port; a lone coordinator refuses a port another process holds.
            ("grpc.so_reuseport", int(replica is not None)),
        ],
    )
    service_pb2_grpc.add_NodeServiceServicer_to_server(NodeServicer(app, gate), server)
    service_pb2_grpc.add_TrainerServiceServicer_to_server(TrainerServicer(app, gate), server)
    service_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(app, gate), server)
    if built.validation is not None:
        validation_pb2_grpc.add_ValidatorServiceServicer_to_server(ValidatorServicer(built.validation, gate), server)
    return server


def _listen(
    config: CoordinatorConfig,
    server: grpc.aio.Server,
    credentials: grpc.ServerCredentials | None,
    replica: Replica | None,
) -> tuple[int, socket.socket]:
    """Bind the gRPC server and an HTTP socket; returns the gRPC port and the socket."""
    grpc_address = f"{config.server.host}:{config.server.grpc_port}"
    try:
        if credentials is None:
            grpc_port = server.add_insecure_port(grpc_address)
        else:
            grpc_port = server.add_secure_port(grpc_address, credentials)
    except RuntimeError:
        raise _bind_error("gRPC", grpc_address, "--grpc-port", "the bind failed") from None
    http_socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    http_socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if replica is not None:
        http_socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        http_socket.bind((config.server.host, config.server.http_port))
    except OSError as error:
        http_socket.close()
        raise _bind_error(
            "HTTP", f"{config.server.host}:{config.server.http_port}", "--http-port", error.strerror or str(error)
        ) from None
    return grpc_port, http_socket


async def serve(config: CoordinatorConfig, replica: Replica | None = None) -> None:
    import uvicorn

    from coordinator.dashboard.web import create_http_app

    credentials = grpc_credentials(config)
    # Requests run their blocking work (the store, checks) in the loop's default executor, and one
    # waiting on a group commit holds its thread meanwhile: asyncio's default of 6 threads queued
    # heartbeats behind them (p99 1.2 s at 2,000 nodes against 0.23 s with 32).
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(max_workers=config.server.request_threads, thread_name_prefix="request")
    )
    setup = await asyncio.to_thread(load_run_setup, config)
    store = await asyncio.to_thread(open_coordinator_store, config)
    if replica is not None and store.database.is_sqlite:
        store.close()
        raise ValueError(REPLICAS_NEED_POSTGRESQL)
    built = build(config, setup, store, config.server.num_replicas or (1 if replica is None else replica.count))
    app, validator = built.app, built.validator
    # After a stop of the whole service (no other replica holds the lock), open leases get a fresh deadline.
    if await asyncio.to_thread(store.housekeeping_lock.held):
        num_extended = await asyncio.to_thread(app.extend_open_leases)
        if num_extended:
            log.info("gave %d leases that were open at the last stop a fresh deadline", num_extended)
    server = _grpc_server(config, built, replica)
    try:
        grpc_port, http_socket = _listen(config, server, credentials, replica)
    except ValueError:
        store.close()
        raise
    http_url = f"http://{config.server.host}:{http_socket.getsockname()[1]}"
    app.dashboard_url = config.server.public_http_url.rstrip("/") or http_url
    http = uvicorn.Server(uvicorn.Config(create_http_app(app), log_level="warning", lifespan="off"))
    first = replica is None or replica.index == 0
    seed = await asyncio.to_thread(start_seed, config, app) if config.p2p.enabled and first else None
    await server.start()
    http_task = asyncio.create_task(http.serve(sockets=[http_socket]))
    background = [asyncio.create_task(_housekeeping(config, app))]
    if validator is not None:
        background.append(asyncio.create_task(_validation_loop(validator, store.housekeeping_lock)))
    endpoints = Endpoints(
        grpc=f"{config.server.host}:{grpc_port}",
        http=http_url,
        p2p=list(app.p2p_bootstrap),
    )
    if first:
        _write_atomically(config.data_dir.expanduser() / ENDPOINTS_FILE, json.dumps(endpoints.__dict__))
    log.info(
        "coordinator%s of run %s on gRPC %s (%s), HTTP %s (%s store)",
        "" if replica is None else f" replica {replica.index + 1} of {replica.count}",
        config.run.run_id,
        endpoints.grpc,
        "plaintext" if credentials is None else "TLS",
        endpoints.http,
        store.backend,
    )
    # What start-up built (imports, the model's tokenizer, the task) lives as long as the process:
    # moved out of the collector's view, a full collection walks only what serving allocates
    # (400 ms pauses at 1,500 nodes before, 10–60 ms after).
    gc.freeze()
    print(f"coordinator grpc={endpoints.grpc} http={endpoints.http}", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("stopping")
    for task in background:
        task.cancel()
    await asyncio.to_thread(app.flush_heartbeats)
    http.should_exit = True
    await server.stop(grace=5)
    await http_task
    if seed is not None:
        await asyncio.to_thread(seed.stop)
    store.close()
