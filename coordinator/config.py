"""Typed configuration of `rollproof coordinator serve` (see configs/coordinator.toml)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SamplingSection(_Section):
    temperature: float = Field(1.0, ge=0.0, description="0 means greedy")
    top_k: int = Field(0, ge=0, description="0 disables the top-k filter")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(32, ge=1, le=32768)


class RunSection(_Section):
    run_id: str = Field("demo", min_length=1, max_length=64)
    task: str = "addition"
    model: Path | None = Field(None, description="HF model directory; unset means the default tiny model")
    seed: int = 0
    group_size: int = Field(8, ge=2, le=256)
    prompts_per_lease: int = Field(4, ge=1, le=1024)
    num_prompts: int = Field(1_000_000, ge=1, description="training prompts are indices 0..num_prompts-1")
    max_staleness: int = Field(2, ge=0, description="k: groups more than k versions behind are not trained on")
    max_backlog_groups: int = Field(
        256, ge=0, description="no new leases while this many groups wait for the trainer (0: no limit)"
    )
    keep_solved_or_failed: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="the pass-rate buffer: the share of leases that still carry a prompt whose last group every "
        "sample solved, or none did (1: no buffer, the default: at 0.25 the addition task on 1,024 prompts reached "
        "its target 1.06-2.46x later in four pairs); matters once prompts repeat (num_prompts below what a run leases)",
    )
    sampling: SamplingSection = SamplingSection()


class ServerSection(_Section):
    host: str = "127.0.0.1"
    grpc_port: int = Field(7470, ge=0, le=65535)
    http_port: int = Field(7471, ge=0, le=65535)
    public_http_url: str = Field(
        "",
        pattern=r"^(https?://\S+)?$",
        description="the dashboard's address as contributors reach it (behind a proxy); default http://HOST:HTTP_PORT",
    )
    max_message_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    requests_per_second_per_node: float = Field(
        50.0, gt=0, description="signed requests of one node, charged once its signature is verified"
    )
    request_burst_per_node: int = Field(100, ge=1)
    requests_per_second_trainer: float = Field(1000.0, gt=0, description="the trainer key's own allowance")
    request_burst_trainer: int = Field(2000, ge=1)
    unauthenticated_requests_per_second_per_address: float = Field(
        200.0,
        gt=0,
        description="per peer host: unsigned RPCs (run info, manifests, blobs) and requests whose envelope or "
        "operator token fails; refused past it, without touching any signer's allowance",
    )
    unauthenticated_request_burst_per_address: int = Field(1000, ge=1)
    registrations_per_second_per_address: float = Field(
        0.5, gt=0, description="per peer host: registrations of keys the coordinator has not seen"
    )
    registration_burst_per_address: int = Field(50, ge=1)
    envelope_window_s: float = Field(60.0, gt=0)
    num_replicas: int = Field(
        0,
        ge=0,
        description="coordinator processes serving this run behind one address, across hosts: each allows "
        "1/num_replicas of every per-node, trainer and per-address rate, so a client that reaches all of them "
        "still gets one allowance; 0: the processes `serve --processes` starts together (1 without)",
    )
    request_threads: int = Field(
        32, ge=1, le=1024, description="threads running requests' blocking work; one waiting on the store holds one"
    )
    tls_cert: Path | None = Field(
        None, description="PEM certificate (chain) of the gRPC side; with tls_key, gRPC is served over TLS only"
    )
    tls_key: Path | None = Field(None, description="unencrypted PEM private key of tls_cert")

    @model_validator(mode="after")
    def _tls_pair(self) -> ServerSection:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("set server.tls_cert and server.tls_key together (`rollproof certs` makes a pair)")
        return self


class LeaseSection(_Section):
    deadline_s: float = Field(120.0, gt=0)
    max_open_per_node: int = Field(2, ge=1)
    walkaway_window: int = Field(
        20, ge=2, description="the number of a node's newest closed leases its releases and expiries are counted over"
    )
    max_walkaway_fraction: float = Field(
        0.25,
        ge=0.0,
        lt=1.0,
        description="a node that released or let expire more than this fraction of its last walkaway_window leases "
        "gets no leases for cooldown_s; doing so again within walkaway_window leases after a cool-down is "
        "also a strike (validation.max_strikes bans)",
    )
    cooldown_s: float = Field(600.0, ge=0.0)


class ValidationSection(_Section):
    enabled: bool = Field(True, description="fully check a sample of submissions")
    in_process: bool = Field(
        True,
        description="run a validator inside the coordinator; false: only `rollproof validator run` processes check",
    )
    lease_s: float = Field(
        300.0, gt=0, description="how long a validator holds the groups it took before another one gets them"
    )
    num_initial_checks: int = Field(
        20, ge=0, description="a new node's submissions are all checked until it passed this many"
    )
    floor_rate: float = Field(
        0.05, gt=0.0, le=1.0, description="the lowest sampling rate, reached with high reputation"
    )
    max_strikes: int = Field(2, ge=1, description="failed submissions (one strike each) before a node is banned")
    probation_tokens: int = Field(
        4096,
        ge=0,
        description="fully checked tokens a node passes before its groups are trainable: its first node-level "
        "verdict (its chunk window judged over at least 128 chunks and its token window over 4096 "
        "tokens, see coordinator/validation.py); 0 holds no groups (a new or doubted node is then only "
        "checked fully until that verdict)",
    )
    device: str = Field("cpu", description="where the in-process validator replays: cpu, cuda or cuda:N")
    precisions: list[Literal["float32", "bfloat16"]] = Field(
        ["float32", "bfloat16"],
        min_length=1,
        description="the compute precisions a node may declare (by its engine); each is held to its own bounds, "
        "and bfloat16's are far looser, so a run whose nodes compute in float32 should accept that alone",
    )


class P2PSection(_Section):
    enabled: bool = Field(False, description="run the seed peer: nodes fetch policy blobs from each other")
    listen: str = "/ip4/127.0.0.1/tcp/0"
    public_address: str = Field("", description="multiaddr nodes should dial; empty: the listen address")
    upload_bytes_per_s: int = Field(50 * 1024 * 1024, ge=1)
    max_concurrent_uploads: int = Field(4, ge=1)
    max_peers: int = Field(256, ge=1)


class StoreSection(_Section):
    url: str = Field("", description="SQLAlchemy URL; empty means SQLite in the data directory")


class SandboxSection(_Section):
    implementation: str = Field("bubblewrap", description="how tasks that run code run it (envs/sandbox.py)")
    max_concurrent: int = Field(0, ge=0, description="programs run at once; 0: the number of cores (at least 2)")
    max_queued: int = Field(1024, ge=0, description="programs that may wait; beyond, a submission is refused")


class CoordinatorConfig(_Section):
    data_dir: Path = Path("~/.rollproof/coordinator")
    trainer_key_fingerprint: str = Field("", description="key id of the trainer key this run accepts")
    operator_token: SecretStr = Field(SecretStr(""), description="bearer token for admin RPCs; empty disables them")
    heartbeat_interval_s: float = Field(10.0, gt=0)
    run: RunSection = RunSection()
    server: ServerSection = ServerSection()
    lease: LeaseSection = LeaseSection()
    store: StoreSection = StoreSection()
    validation: ValidationSection = ValidationSection()
    p2p: P2PSection = P2PSection()
    sandbox: SandboxSection = SandboxSection()
