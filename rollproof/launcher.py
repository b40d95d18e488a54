"""`rollproof up`: the whole system on one machine — coordinator (with its validator),
trainer and N nodes as child processes on loopback — with a live progress view.
Ctrl-C (or the trainer reaching --steps) stops every child by its pid."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from protocol.identity import Identity
from protocol.tls import CoordinatorTls, make_self_signed_pair

STARTUP_TIMEOUT_S = 180
# The embedded run's settings, tuned for the default tiny model on a 2-core machine; flags of the
# command line come after them and win. Leases of 16 prompts (128 sequences, one engine batch): at a
# lease's 32 sequences the tiny model's decoding is mostly per-step overhead, and the trainer waited
# 0.19 s a step for rollouts against 0.05 s (docs/benchmarks.md, bench/rl_vs_trl.py).
EMBEDDED_PROMPTS_PER_LEASE = 16
EMBEDDED_COORDINATOR_SETTINGS = [
    "run.max_backlog_groups=128",
    f"run.prompts_per_lease={EMBEDDED_PROMPTS_PER_LEASE}",
    'validation.precisions=["float32"]',
]
EMBEDDED_NODE_SETTINGS = ["engine.threads=1", f"engine.batch_size={EMBEDDED_PROMPTS_PER_LEASE * 8}"]  # G = 8
EMBEDDED_TRAINER_SETTINGS = [
    "optimizer.lr=3e-4",
    "groups_per_step=64",
    "threads=1",
    "eval_every=10",
    "eval_problems=200",
]
REFRESH_S = 1.0
MAX_COORDINATOR_RESTARTS = 5


def _port_or_free(preferred: int) -> int:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]


def as_set_flags(assignments: list[str]) -> list[str]:
    return [flag for assignment in assignments for flag in ("--set", assignment)]


@dataclass
class Child:
    name: str
    popen: subprocess.Popen
    log_path: Path
    args: list[str] = field(default_factory=list)
    env: dict[str, str] | None = None


@dataclass
class UpOptions:
    model: Path
    task: str
    num_nodes: int
    num_steps: int
    run_dir: Path
    extra_coordinator: list[str] = field(default_factory=list)
    extra_trainer: list[str] = field(default_factory=list)
    extra_node: list[str] = field(default_factory=list)


class Launcher:
    def __init__(self, options: UpOptions):
        self.options = options
        self.children: list[Child] = []
        self.num_coordinator_restarts = 0
        self.operator_token = secrets.token_urlsafe(24)
        self.run_dir = options.run_dir
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "logs").mkdir(exist_ok=True)
        key_path = self.run_dir / "trainer" / "trainer.key"
        self.trainer_identity = Identity.load_or_create(key_path)
        self.certificate_pair = make_self_signed_pair(self.run_dir / "tls", overwrite=True)
        self.grpc_port = _port_or_free(7470)
        self.http_port = _port_or_free(7471)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def coordinator_tls(self) -> CoordinatorTls:
        return CoordinatorTls(ca_file=self.certificate_pair.certificate_file)

    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/"

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Child:
        log_path = self.run_dir / "logs" / f"{name}.log"
        with open(log_path, "ab") as handle:
            popen = subprocess.Popen(
                [sys.executable, "-m", "rollproof.cli", *args],
                stdout=handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                start_new_session=True,
            )
        child = Child(name, popen, log_path, args, env)
        self.children.append(child)
        return child

    def revive_coordinator(self) -> bool:
        """Start the coordinator again if it exited without being told to: it picks up from its
        store, and the trainer and nodes ride out the gap under their retry policy. Returns
        whether it did; past MAX_COORDINATOR_RESTARTS an exit is left to be reported."""
        coordinator = self.child("coordinator")
        if coordinator.popen.poll() is None or self.num_coordinator_restarts >= MAX_COORDINATOR_RESTARTS:
            return False
        self.num_coordinator_restarts += 1
        self.children.remove(coordinator)
        self._spawn(coordinator.name, coordinator.args, coordinator.env)
        return True

    def start(self) -> None:
        o = self.options
        endpoints = self.run_dir / "coordinator" / "endpoints.json"
        pair = self.certificate_pair
        tls_settings = [f"server.tls_cert={pair.certificate_file}", f"server.tls_key={pair.key_file}"]
        coordinator = self._spawn(
            "coordinator",
            [
                "coordinator",
                "serve",
                "--data-dir",
                str(self.run_dir / "coordinator"),
                "--model",
                str(o.model),
                "--task",
                o.task,
                "--grpc-port",
                str(self.grpc_port),
                "--http-port",
                str(self.http_port),
                "--trainer-key-fingerprint",
                self.trainer_identity.key_id,
                *as_set_flags(EMBEDDED_COORDINATOR_SETTINGS),
                *as_set_flags(tls_settings),
                *o.extra_coordinator,
            ],
            env={"ROLLPROOF_COORDINATOR_OPERATOR_TOKEN": self.operator_token},
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not endpoints.exists():
            if coordinator.popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the coordinator did not start; see {coordinator.log_path}")
            time.sleep(0.2)
        self._spawn(
            "trainer",
            [
                "trainer",
                "run",
                "--coordinator",
                self.address,
                "--coordinator-ca",
                str(pair.certificate_file),
                "--model",
                str(o.model),
                "--data-dir",
                str(self.run_dir / "trainer"),
                "--max-steps",
                str(o.num_steps),
                *as_set_flags(EMBEDDED_TRAINER_SETTINGS),
                *o.extra_trainer,
            ],
        )
        for index in range(o.num_nodes):
            self._spawn(
                f"node-{index + 1}",
                [
                    "node",
                    "run",
                    "--coordinator",
                    self.address,
                    "--coordinator-ca",
                    str(pair.certificate_file),
                    "--model",
                    str(o.model),
                    "--state-dir",
                    str(self.run_dir / f"node-{index + 1}"),
                    "--trainer-key-fingerprint",
                    self.trainer_identity.key_id,
                    # as --set, so that a --node-set of the same key (given after) wins
                    *as_set_flags([f"display_name=local-{index + 1}", *EMBEDDED_NODE_SETTINGS]),
                    *o.extra_node,
                ],
            )

    def child(self, name: str) -> Child:
        return next(c for c in self.children if c.name == name)

    def stop(self, timeout_s: float = 60) -> None:
        """Nodes first (they finish or spool their lease), then the trainer (it checkpoints),
        then the coordinator."""
        groups = [
            [c for c in self.children if c.name.startswith("node")],
            [c for c in self.children if c.name == "trainer"],
            [c for c in self.children if c.name == "coordinator"],
        ]
        for group in groups:
            for child in group:
                if child.popen.poll() is None:
                    os.kill(child.popen.pid, signal.SIGTERM)
            for child in group:
                try:
                    child.popen.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    os.kill(child.popen.pid, signal.SIGKILL)
                    child.popen.wait()

    # ---- progress ----

    def metrics(self) -> list[dict]:
        path = self.run_dir / "trainer" / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def node_statuses(self) -> list[dict]:
        statuses = []
        for index in range(self.options.num_nodes):
            path = self.run_dir / f"node-{index + 1}" / "status.json"
            try:
                statuses.append(json.loads(path.read_text()))
            except (FileNotFoundError, json.JSONDecodeError):
                continue
        return statuses

    def eval_curve(self) -> list[tuple[int, float, float]]:
        """(step, seconds since the first record, held-out reward) for every evaluation."""
        records = [r for r in self.metrics() if "eval_reward" in r]
        if not records:
            return []
        start = records[0]["time"]
        return [(r["step"], r["time"] - start, r["eval_reward"]) for r in records]
