"""Real processes on loopback for integration tests: a coordinator, nodes, a trainer.
Every process is started with the real CLI and stopped by its pid. gRPC runs over TLS, with a
self-signed certificate that every client of the cluster trusts."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from protocol.channel import open_channel
from protocol.identity import Identity
from protocol.tls import CoordinatorTls, make_self_signed_pair
from rollproof.commands.admin import CA_ENVIRONMENT_VARIABLE

OPERATOR_TOKEN = "test-operator-token"

# The coordinator the attack suites and the rejection tests run against: every submission fully
# checked (a node never leaves its initial checks), small leases of small groups.
CHECKING_SETTINGS = (
    "validation.num_initial_checks=1000000",
    "lease.max_open_per_node=4",
    "run.prompts_per_lease=2",
    "run.group_size=8",
    "run.sampling.max_tokens=32",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill9(self) -> None:
        os.kill(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=30)

    def terminate(self, timeout_s: float = 60) -> int:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.kill(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=30)
        return self.popen.returncode


@dataclass
class Cluster:
    root: Path
    model_dir: Path
    trainer_identity: Identity
    grpc_port: int = field(default_factory=free_port)
    processes: list[Process] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.certificate_pair = make_self_signed_pair(self.root / "tls", overwrite=True)

    @property
    def coordinator_tls(self) -> CoordinatorTls:
        return CoordinatorTls(ca_file=self.certificate_pair.certificate_file)

    def channel(self) -> grpc.Channel:
        return open_channel(self.address, self.coordinator_tls)

    def tls_environment(self) -> dict[str, str]:
        """Every client role spawned (node, trainer, validator, admin) trusts the cluster's certificate."""
        ca_file = str(self.certificate_pair.certificate_file)
        return {
            "ROLLPROOF_NODE_COORDINATOR_CA": ca_file,
            "ROLLPROOF_TRAINER_COORDINATOR_CA": ca_file,
            CA_ENVIRONMENT_VARIABLE: ca_file,
        }

    @property
    def coordinator_dir(self) -> Path:
        return self.root / "coordinator"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def spawn(
        self, name: str, args: list[str], env: dict[str, str] | None = None, launcher: tuple[str, ...] = ()
    ) -> Process:
        """`rollproof ARGS` as a child process; `launcher`: interpreter arguments before the
        CLI module (e.g. torchrun's `-m torch.distributed.run ...`)."""
        log_path = self.root / f"{name}.log"
        with open(log_path, "ab") as handle:
            popen = subprocess.Popen(
                [sys.executable, *launcher, "-m", "rollproof.cli", *args],
                stdout=handle,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.tls_environment(), **(env or {})},
                start_new_session=True,
            )
        process = Process(name, popen, log_path)
        self.processes.append(process)
        return process

    def start_coordinator(self, *extra: str) -> Process:
        endpoints = self.coordinator_dir / "endpoints.json"
        endpoints.unlink(missing_ok=True)
        process = self.spawn(
            "coordinator",
            [
                "coordinator",
                "serve",
                "--data-dir",
                str(self.coordinator_dir),
                "--model",
                str(self.model_dir),
                "--grpc-port",
                str(self.grpc_port),
                "--http-port",
                "0",
                "--trainer-key-fingerprint",
                self.trainer_identity.key_id,
                "--set",
                f"server.tls_cert={self.certificate_pair.certificate_file}",
                "--set",
                f"server.tls_key={self.certificate_pair.key_file}",
                *extra,
            ],
            env={"ROLLPROOF_COORDINATOR_OPERATOR_TOKEN": OPERATOR_TOKEN},
        )
        wait_for(lambda: endpoints.exists() or process.popen.poll() is not None, 120, "the coordinator to listen")
        assert process.popen.poll() is None, process.log()
        return process

    def http_address(self) -> str:
        return json.loads((self.coordinator_dir / "endpoints.json").read_text())["http"]

    def start_node(self, name: str, *extra: str) -> Process:
        return self.spawn(
            name,
            [
                "node",
                "run",
                "--coordinator",
                self.address,
                "--model",
                str(self.model_dir),
                "--state-dir",
                str(self.root / name),
                "--trainer-key-fingerprint",
                self.trainer_identity.key_id,
                "--name",
                name,
                *extra,
            ],
        )

    def query(self, sql: str, *args) -> list[tuple]:
        """Read the coordinator's SQLite store directly (WAL: safe beside the running process)."""
        connection = sqlite3.connect(self.coordinator_dir / "coordinator.sqlite3", timeout=30)
        try:
            return connection.execute(sql, args).fetchall()
        finally:
            connection.close()

    def publish_fixed_policy(self) -> None:
        """Version 1 of the run, written into the coordinator's blob directory as a trainer would."""
        from coordinator.blobstore import BlobStore
        from policy.model import load_model
        from trainer.publish import PolicyPublisher

        blobs = BlobStore(
            self.coordinator_dir / "policy", run_id="demo", trainer_public_key=self.trainer_identity.public_key
        )
        PolicyPublisher(self.trainer_identity, "demo", blobs).publish_model(1, load_model(self.model_dir))

    def stop_all(self) -> None:
        for process in reversed(self.processes):
            process.terminate(timeout_s=30)


@contextmanager
def checking_cluster(root: Path, model_dir: Path, *settings: str) -> Iterator[Cluster]:
    """A coordinator that fully checks every submission, with a fixed published policy (version 1
    of `model_dir`) and a fresh trainer key, stopped on exit. `settings` (`KEY=VALUE`, as `--set`
    takes them) replace CHECKING_SETTINGS of the same key or add to them."""
    merged = dict(setting.split("=", 1) for setting in (*CHECKING_SETTINGS, *settings))
    cluster = Cluster(root, model_dir, Identity.generate())
    try:
        cluster.publish_fixed_policy()
        cluster.start_coordinator(*(flag for key, value in merged.items() for flag in ("--set", f"{key}={value}")))
        yield cluster
    finally:
        cluster.stop_all()


def postgres_admin():
    """An autocommit psycopg connection to the local PostgreSQL server (127.0.0.1:5432, trust auth, user
    postgres, database test); the calling test is skipped when no server answers."""
    import psycopg

    try:
        return psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test connect_timeout=3", autocommit=True)
    except psycopg.OperationalError as error:
        pytest.skip(f"no PostgreSQL server answers at 127.0.0.1:5432 (database test, user postgres): {error}")


@contextmanager
def postgres_database() -> Iterator[str]:
    """The SQLAlchemy URL of a fresh database on the local PostgreSQL server, dropped on exit (see
    postgres_admin)."""
    admin = postgres_admin()
    name = f"rp_{secrets.token_hex(6)}"
    with admin:
        admin.execute(f"CREATE DATABASE {name}")
        try:
            yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
        finally:
            admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
