"""Typed configuration of `rollproof trainer run` (see configs/trainer.toml)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from protocol.tls import CoordinatorTls


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OptimizerSection(_Section):
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)
    grad_clip: float = Field(1.0, gt=0)


class LossSection(_Section):
    normalize_advantage_std: bool = False
    ratio_low: float = Field(0.5, gt=0, lt=1, description="tokens with importance ratio below are masked")
    ratio_high: float = Field(2.0, gt=1, description="tokens with importance ratio above are masked")
    kl_coef: float = Field(0.0, ge=0)
    token_mean_over: Literal["all_groups", "informative_groups"] = Field(
        "all_groups",
        description="the loss sums over sampled tokens and divides by those of all_groups: every group of the "
        "step, the uninformative ones (skipped, their gradient is zero) too, as DAPO's token mean over the batch, so a "
        "step with fewer informative groups moves the policy less; informative_groups: only those trained on",
    )


class TrainerConfig(_Section):
    coordinator: str = Field("127.0.0.1:7470", pattern=r"^[^\s:]+:\d{1,5}$")
    coordinator_ca: Path | None = Field(
        None, description="PEM file of the CA (or the self-signed certificate) of the coordinator's TLS certificate"
    )
    coordinator_fingerprint: str = Field(
        "", description="SHA-256 fingerprint of the coordinator's TLS certificate, pinned instead of coordinator_ca"
    )
    data_dir: Path = Path("~/.rollproof/trainer")
    key_file: Path | None = Field(None, description="policy signing key; default: <data_dir>/trainer.key")
    model: Path | None = Field(None, description="HF model directory; unset means the default tiny model")
    device: str = Field(
        "cpu", pattern=r"^(cpu|cuda(:\d+)?)$", description="under torchrun, cuda means each process's LOCAL_RANK GPU"
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="weights and compute; under torchrun, compute only (float32 master weights)"
    )
    threads: int = Field(0, ge=0, description="CPU threads of torch in each trainer process; 0: torch's default")
    max_staleness: int = Field(2, ge=0)
    groups_per_step: int = Field(8, ge=1)
    max_steps: int = Field(0, ge=0, description="0 means run until stopped")
    checkpoint_every: int = Field(10, ge=1)
    eval_every: int = Field(10, ge=0, description="held-out eval of the published policy every N steps; 0: never")
    eval_problems: int = Field(100, ge=1)
    keyframe_interval: int = Field(20, ge=1, description="publish a keyframe besides the delta every N versions")
    metrics_file: Path | None = Field(None, description="default: <data_dir>/metrics.jsonl")
    wandb_project: str = ""
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus endpoint on 127.0.0.1; 0: off")
    optimizer: OptimizerSection = OptimizerSection()
    loss: LossSection = LossSection()

    @property
    def coordinator_tls(self) -> CoordinatorTls:
        return CoordinatorTls(self.coordinator_ca, self.coordinator_fingerprint)

    @model_validator(mode="after")
    def _check_coordinator_tls(self) -> TrainerConfig:
        _ = self.coordinator_tls  # raises on a malformed fingerprint, or on both being set
        return self
