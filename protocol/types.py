"""Domain types for the messages parties exchange. protocol/convert.py maps them to and
from the protobuf wire format; nothing else touches the generated classes' fields."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Codec(enum.IntEnum):
    KEYFRAME = 1
    DELTA = 2


class FinishReason(enum.IntEnum):
    STOP = 1
    LENGTH = 2


class NodeState(enum.IntEnum):
    ONLINE = 1
    STALE = 2
    OFFLINE = 3
    BANNED = 4


class RejectReason(enum.IntEnum):
    BAD_ENVELOPE = 1
    UNKNOWN_LEASE = 2
    LEASE_NOT_OWNED = 3
    LEASE_EXPIRED = 4
    WRONG_POLICY_VERSION = 5
    SCHEMA = 6
    TOKEN_OUT_OF_VOCAB = 7
    TOO_LONG = 8
    WRONG_GROUP_SIZE = 9
    FINISH_REASON_INCONSISTENT = 10
    DUPLICATE = 11
    REWARD_MISMATCH = 12
    COMMITMENT_MISMATCH = 13
    SAMPLING_MISMATCH = 14
    LOGPROB_DRIFT = 15
    TERMINATION = 16
    NODE_BANNED = 17
    QUARANTINED = 18
    ENVIRONMENT_MISMATCH = 19
    TURN_LIMIT = 20
    SAMPLED_MASK = 21


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str = "bf16"


@dataclass(frozen=True)
class BlobRef:
    hash: bytes
    size: int
    uncompressed_size: int


@dataclass(frozen=True)
class PolicyManifest:
    run_id: str
    version: int
    base_version: int
    codec: Codec
    tensors: tuple[TensorSpec, ...]
    blobs: tuple[BlobRef, ...]
    state_hash: bytes
    created_at_ms: int
    base_state_hash: bytes = b""


@dataclass(frozen=True)
class SignedManifest:
    """A manifest with the exact bytes its signature covers."""

    manifest_bytes: bytes
    signer_public_key: bytes
    signature: bytes


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_tokens: int = 64


@dataclass(frozen=True)
class LeasedPrompt:
    prompt_index: int
    prompt_text: str
    prompt_token_ids: tuple[int, ...]


@dataclass(frozen=True)
class WorkLease:
    lease_id: str
    node_id: str
    task: str
    policy_version: int
    prompts: tuple[LeasedPrompt, ...]
    group_size: int
    sampling: SamplingParams
    sampling_seed: int
    deadline_ms: int


@dataclass(frozen=True)
class Rollout:
    sample_index: int
    token_ids: tuple[int, ...]
    sampled_mask: tuple[bool, ...]
    logprobs: tuple[float, ...]
    commitment: bytes
    finish_reason: FinishReason
    claimed_reward: float


@dataclass(frozen=True)
class RolloutGroup:
    prompt_index: int
    rollouts: tuple[Rollout, ...]


@dataclass(frozen=True)
class RolloutBatch:
    lease_id: str
    policy_version: int
    groups: tuple[RolloutGroup, ...]
    engine: str


@dataclass(frozen=True)
class RolloutVerdict:
    prompt_index: int
    sample_index: int
    accepted: bool
    reason: RejectReason | None = None
    message: str = ""


@dataclass(frozen=True)
class Receipt:
    lease_id: str
    batch_hash: bytes
    verdicts: tuple[RolloutVerdict, ...] = field(default_factory=tuple)

    @property
    def num_accepted(self) -> int:
        return sum(v.accepted for v in self.verdicts)

    @property
    def num_rejected(self) -> int:
        return len(self.verdicts) - self.num_accepted


@dataclass(frozen=True)
class ReadyGroup:
    """An accepted group the trainer may use, with the prompt it answers."""

    group_id: str
    policy_version: int
    prompt_index: int
    prompt_token_ids: tuple[int, ...]
    group: RolloutGroup
    node_id: str
