"""Typed configuration of `rollproof node run` (see configs/node.toml)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from protocol.identity import public_key_from_key_id
from protocol.tls import CoordinatorTls


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EngineSection(_Section):
    kind: Literal["torch", "vllm"] = "torch"
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?)$")
    dtype: Literal["float32", "bfloat16"] = "float32"
    threads: int = Field(1, ge=1, le=512)
    batch_size: int = Field(32, ge=1, le=4096)


class P2PSection(_Section):
    enabled: bool = False
    listen: str = "/ip4/127.0.0.1/tcp/0"
    public_address: str = ""
    upload_bytes_per_s: int = Field(50 * 1024 * 1024, ge=1)
    max_concurrent_uploads: int = Field(4, ge=1)
    max_peers: int = Field(16, ge=1)
    cache_bytes: int = Field(512 * 1024 * 1024, ge=1, description="fetched blobs kept to serve to peers")
    bootstrap: list[str] = Field(
        default_factory=list, description="multiaddrs ending in /p2p/<peer id> of the seed peers beside the coordinator"
    )


class NodeConfig(_Section):
    coordinator: str = Field("127.0.0.1:7470", pattern=r"^[^\s:]+:\d{1,5}$")
    coordinator_ca: Path | None = Field(
        None, description="PEM file of the CA (or the self-signed certificate) of the coordinator's TLS certificate"
    )
    coordinator_fingerprint: str = Field(
        "", description="SHA-256 fingerprint of the coordinator's TLS certificate, pinned instead of coordinator_ca"
    )
    state_dir: Path = Path("~/.rollproof/node")
    key_file: Path | None = Field(None, description="default: <state_dir>/node.key")
    display_name: str = Field("", max_length=64)
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus endpoint on 127.0.0.1; 0: off")
    trainer_key_fingerprint: str = Field("", description="key id of the trainer key to trust; required")
    engine: EngineSection = EngineSection()
    p2p: P2PSection = P2PSection()

    @field_validator("trainer_key_fingerprint")
    @classmethod
    def _check_trainer_key_fingerprint(cls, value: str) -> str:
        if value:
            public_key_from_key_id(value)  # raises naming the value: a typo fails at start, not at first contact
        return value

    @property
    def coordinator_tls(self) -> CoordinatorTls:
        return CoordinatorTls(self.coordinator_ca, self.coordinator_fingerprint)

    @model_validator(mode="after")
    def _check_coordinator_tls(self) -> NodeConfig:
        _ = self.coordinator_tls  # raises on a malformed fingerprint, or on both being set
        return self
