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

STARTUP_TIMEOUT_S = 180
# The embedded run's settings, tuned for the default tiny model on a 2-core machine; flags of the
# command line come after them and win.
EMBEDDED_COORDINATOR_SETTINGS = ["run.max_backlog_groups=128", 'validation.precisions=["float32"]']
EMBEDDED_TRAINER_SETTINGS = [
    "optimizer.lr=3e-4", "groups_per_step=64", "threads=1", "eval_every=10", "eval_problems=200",
]
REFRESH_S = 1.0


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
        self.operator_token = secrets.token_urlsafe(24)
        self.run_dir = options.run_dir
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "logs").mkdir(exist_ok=True)
        key_path = self.run_dir / "trainer" / "trainer.key"
        self.trainer_identity = Identity.load_or_create(key_path)
        self.grpc_port = _port_or_free(7470)
        self.http_port = _port_or_free(7471)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

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
        child = Child(name, popen, log_path)
        self.children.append(child)
        return child

    def start(self) -> None:
        o = self.options
        endpoints = self.run_dir / "coordinator" / "endpoints.json"
        coordinator = self._spawn(
            "coordinator",
            [
                "coordinator", "serve",
                "--data-dir", str(self.run_dir / "coordinator"),
                "--model", str(o.model),
                "--task", o.task,
                "--grpc-port", str(self.grpc_port),
                "--http-port", str(self.http_port),
                "--trainer-key-fingerprint", self.trainer_identity.key_id,
                *as_set_flags(EMBEDDED_COORDINATOR_SETTINGS),
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
                "trainer", "run",
                "--coordinator", self.address,
                "--model", str(o.model),
                "--data-dir", str(self.run_dir / "trainer"),
                "--max-steps", str(o.num_steps),
                *as_set_flags(EMBEDDED_TRAINER_SETTINGS),
                *o.extra_trainer,
            ],
        )
        for index in range(o.num_nodes):
            self._spawn(
                f"node-{index + 1}",
                [
                    "node", "run",
                    "--coordinator", self.address,
                    "--model", str(o.model),
                    "--state-dir", str(self.run_dir / f"node-{index + 1}"),
                    "--trainer-key-fingerprint", self.trainer_identity.key_id,
                    "--name", f"local-{index + 1}",
                    "--threads", "1",
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
