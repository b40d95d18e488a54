"""The one place that maps domain types (protocol/types.py) to protobuf and back.

`*_from_proto` functions validate structure (enum values, mask length) and raise
WireFormatError naming the field; bounds that depend on the run (vocabulary, lengths)
are the coordinator's checks.
"""

from __future__ import annotations

import enum
import math
from typing import TypeVar, cast

import numpy as np
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from protocol import types
from protocol.proto import policy_pb2, rollout_pb2, service_pb2

# Integers are stored as signed 64-bit (SQLite, PostgreSQL BIGINT): larger unsigned values are refused.
MAX_UINT_VALUE = 2**63 - 1
# The most elements of one repeated message or string field of any request; a rollout batch's
# groups and rollouts are bounded by its lease beforehand (far below this).
MAX_REPEATED_ELEMENTS = 4096

_UNSIGNED_64 = (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64)
_COUNTED = (FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES)
_HAS_BOUNDS: dict[str, bool] = {}  # by message type: see _has_bounds

EnumT = TypeVar("EnumT", bound=enum.IntEnum)


class WireFormatError(ValueError):
    """A message decoded, but a field holds a value the protocol does not allow."""


def _has_bounds(descriptor: Descriptor, seen: frozenset[str] = frozenset()) -> bool:
    """Whether messages of this type can hold anything check_bounds refuses (most rollout fields
    cannot, so a batch's rollouts are not walked)."""
    if descriptor.full_name in seen:
        return False
    for field in descriptor.fields:
        if field.type in _UNSIGNED_64 or (field.is_repeated and field.type in _COUNTED):
            return True
        nested = field.message_type if field.type == FieldDescriptor.TYPE_MESSAGE else None
        if nested is not None and _has_bounds(nested, seen | {descriptor.full_name}):
            return True
    return False


def check_bounds(message: Message, path: str = "") -> None:
    """The schema check of every decoded request: no 64-bit unsigned integer above MAX_UINT_VALUE,
    and no repeated message or string field longer than MAX_REPEATED_ELEMENTS (the count of a
    packed number field is bounded by the message size). Raises WireFormatError naming the field."""
    descriptor = cast(Descriptor, message.DESCRIPTOR)  # the upb descriptor has the same interface
    if descriptor.full_name not in _HAS_BOUNDS:
        _HAS_BOUNDS[descriptor.full_name] = _has_bounds(descriptor)
    if not _HAS_BOUNDS[descriptor.full_name]:
        return
    for field, value in message.ListFields():
        name = f"{path}{field.name}"
        if field.is_repeated and field.type not in _COUNTED:
            if field.type in _UNSIGNED_64 and max(value) > MAX_UINT_VALUE:
                raise WireFormatError(f"{name}: {max(value)} is larger than {MAX_UINT_VALUE}")
            continue
        if field.is_repeated and len(value) > MAX_REPEATED_ELEMENTS:
            raise WireFormatError(f"{name}: {len(value)} elements, at most {MAX_REPEATED_ELEMENTS} are allowed")
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.is_repeated:
                for index, item in enumerate(value):
                    check_bounds(item, f"{name}[{index}].")
            else:
                check_bounds(value, f"{name}.")
        elif field.type in _UNSIGNED_64 and value > MAX_UINT_VALUE:
            raise WireFormatError(f"{name}: {value} is larger than {MAX_UINT_VALUE}")


def _enum_from_proto(enum_cls: type[EnumT], value: int, field_name: str) -> EnumT:
    try:
        return enum_cls(value)
    except ValueError:
        raise WireFormatError(f"{field_name}: {value} is not a valid {enum_cls.__name__}") from None


def pack_mask(mask: tuple[bool, ...]) -> bytes:
    """One bit per token, least significant bit first."""
    return np.packbits(np.fromiter(mask, dtype=bool, count=len(mask)), bitorder="little").tobytes()


def unpack_mask(packed: bytes, num_tokens: int) -> tuple[bool, ...]:
    if len(packed) != math.ceil(num_tokens / 8):
        raise WireFormatError(
            f"sampled_mask: {len(packed)} bytes for {num_tokens} tokens, expected {math.ceil(num_tokens / 8)}"
        )
    if num_tokens % 8 and packed[-1] >> (num_tokens % 8):
        raise WireFormatError("sampled_mask: padding bits past the last token must be zero")
    bits = np.unpackbits(np.frombuffer(packed, dtype=np.uint8), count=num_tokens, bitorder="little")
    return tuple(bits.view(bool).tolist())


# ---- policy ----

_DTYPE_TO_PROTO = {"bf16": policy_pb2.DTYPE_BF16}
_DTYPE_FROM_PROTO = {v: k for k, v in _DTYPE_TO_PROTO.items()}


def tensor_spec_to_proto(spec: types.TensorSpec) -> policy_pb2.TensorSpec:
    return policy_pb2.TensorSpec(name=spec.name, shape=list(spec.shape), dtype=_DTYPE_TO_PROTO[spec.dtype])


def tensor_spec_from_proto(message: policy_pb2.TensorSpec) -> types.TensorSpec:
    if message.dtype not in _DTYPE_FROM_PROTO:
        raise WireFormatError(f"tensors[{message.name!r}].dtype: unsupported value {message.dtype}")
    return types.TensorSpec(name=message.name, shape=tuple(message.shape), dtype=_DTYPE_FROM_PROTO[message.dtype])


def blob_ref_to_proto(blob: types.BlobRef) -> policy_pb2.BlobRef:
    return policy_pb2.BlobRef(hash=blob.hash, size=blob.size, uncompressed_size=blob.uncompressed_size)


def blob_ref_from_proto(message: policy_pb2.BlobRef) -> types.BlobRef:
    return types.BlobRef(hash=message.hash, size=message.size, uncompressed_size=message.uncompressed_size)


def manifest_to_proto(manifest: types.PolicyManifest) -> policy_pb2.PolicyManifest:
    return policy_pb2.PolicyManifest(
        run_id=manifest.run_id,
        version=manifest.version,
        base_version=manifest.base_version,
        codec=policy_pb2.Codec.ValueType(manifest.codec),
        tensors=[tensor_spec_to_proto(t) for t in manifest.tensors],
        blobs=[blob_ref_to_proto(b) for b in manifest.blobs],
        state_hash=manifest.state_hash,
        created_at_ms=manifest.created_at_ms,
        base_state_hash=manifest.base_state_hash,
    )


def manifest_from_proto(message: policy_pb2.PolicyManifest) -> types.PolicyManifest:
    return types.PolicyManifest(
        run_id=message.run_id,
        version=message.version,
        base_version=message.base_version,
        codec=_enum_from_proto(types.Codec, message.codec, "codec"),
        tensors=tuple(tensor_spec_from_proto(t) for t in message.tensors),
        blobs=tuple(blob_ref_from_proto(b) for b in message.blobs),
        state_hash=message.state_hash,
        created_at_ms=message.created_at_ms,
        base_state_hash=message.base_state_hash,
    )


def signed_manifest_to_proto(signed: types.SignedManifest) -> policy_pb2.SignedManifest:
    return policy_pb2.SignedManifest(
        manifest=signed.manifest_bytes, signer_public_key=signed.signer_public_key, signature=signed.signature
    )


def signed_manifest_from_proto(message: policy_pb2.SignedManifest) -> types.SignedManifest:
    return types.SignedManifest(
        manifest_bytes=message.manifest, signer_public_key=message.signer_public_key, signature=message.signature
    )


# ---- work and rollouts ----


def sampling_to_proto(params: types.SamplingParams) -> rollout_pb2.SamplingParams:
    return rollout_pb2.SamplingParams(
        temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, max_tokens=params.max_tokens
    )


def sampling_from_proto(message: rollout_pb2.SamplingParams) -> types.SamplingParams:
    return types.SamplingParams(
        temperature=message.temperature, top_k=message.top_k, top_p=message.top_p, max_tokens=message.max_tokens
    )


def lease_to_proto(lease: types.WorkLease) -> rollout_pb2.WorkLease:
    return rollout_pb2.WorkLease(
        lease_id=lease.lease_id,
        node_id=lease.node_id,
        task=lease.task,
        policy_version=lease.policy_version,
        prompts=[
            rollout_pb2.LeasedPrompt(
                prompt_index=p.prompt_index, prompt_text=p.prompt_text, prompt_token_ids=list(p.prompt_token_ids)
            )
            for p in lease.prompts
        ],
        group_size=lease.group_size,
        sampling=sampling_to_proto(lease.sampling),
        sampling_seed=lease.sampling_seed,
        deadline_ms=lease.deadline_ms,
    )


def lease_from_proto(message: rollout_pb2.WorkLease) -> types.WorkLease:
    return types.WorkLease(
        lease_id=message.lease_id,
        node_id=message.node_id,
        task=message.task,
        policy_version=message.policy_version,
        prompts=tuple(
            types.LeasedPrompt(
                prompt_index=p.prompt_index, prompt_text=p.prompt_text, prompt_token_ids=tuple(p.prompt_token_ids)
            )
            for p in message.prompts
        ),
        group_size=message.group_size,
        sampling=sampling_from_proto(message.sampling),
        sampling_seed=message.sampling_seed,
        deadline_ms=message.deadline_ms,
    )


def rollout_to_proto(rollout: types.Rollout) -> rollout_pb2.Rollout:
    return rollout_pb2.Rollout(
        sample_index=rollout.sample_index,
        token_ids=list(rollout.token_ids),
        sampled_mask=pack_mask(rollout.sampled_mask),
        logprobs=list(rollout.logprobs),
        commitment=rollout.commitment,
        finish_reason=rollout_pb2.FinishReason.ValueType(rollout.finish_reason),
        claimed_reward=rollout.claimed_reward,
    )


def rollout_from_proto(message: rollout_pb2.Rollout) -> types.Rollout:
    return types.Rollout(
        sample_index=message.sample_index,
        token_ids=tuple(message.token_ids),
        sampled_mask=unpack_mask(message.sampled_mask, len(message.token_ids)),
        logprobs=tuple(message.logprobs),
        commitment=message.commitment,
        finish_reason=_enum_from_proto(types.FinishReason, message.finish_reason, "finish_reason"),
        claimed_reward=message.claimed_reward,
    )


def group_to_proto(group: types.RolloutGroup) -> rollout_pb2.RolloutGroup:
    return rollout_pb2.RolloutGroup(
        prompt_index=group.prompt_index, rollouts=[rollout_to_proto(r) for r in group.rollouts]
    )


def group_from_proto(message: rollout_pb2.RolloutGroup) -> types.RolloutGroup:
    return types.RolloutGroup(
        prompt_index=message.prompt_index, rollouts=tuple(rollout_from_proto(r) for r in message.rollouts)
    )


def batch_to_proto(batch: types.RolloutBatch) -> rollout_pb2.RolloutBatch:
    return rollout_pb2.RolloutBatch(
        lease_id=batch.lease_id,
        policy_version=batch.policy_version,
        groups=[group_to_proto(g) for g in batch.groups],
        engine=batch.engine,
    )


def batch_from_proto(message: rollout_pb2.RolloutBatch) -> types.RolloutBatch:
    return types.RolloutBatch(
        lease_id=message.lease_id,
        policy_version=message.policy_version,
        groups=tuple(group_from_proto(g) for g in message.groups),
        engine=message.engine,
    )


def receipt_to_proto(receipt: types.Receipt) -> rollout_pb2.Receipt:
    return rollout_pb2.Receipt(
        lease_id=receipt.lease_id,
        batch_hash=receipt.batch_hash,
        verdicts=[
            rollout_pb2.RolloutVerdict(
                prompt_index=v.prompt_index,
                sample_index=v.sample_index,
                accepted=v.accepted,
                reason=rollout_pb2.RejectReason.ValueType(v.reason if v.reason is not None else 0),
                message=v.message,
            )
            for v in receipt.verdicts
        ],
        num_accepted=receipt.num_accepted,
        num_rejected=receipt.num_rejected,
    )


def receipt_from_proto(message: rollout_pb2.Receipt) -> types.Receipt:
    return types.Receipt(
        lease_id=message.lease_id,
        batch_hash=message.batch_hash,
        verdicts=tuple(
            types.RolloutVerdict(
                prompt_index=v.prompt_index,
                sample_index=v.sample_index,
                accepted=v.accepted,
                reason=_enum_from_proto(types.RejectReason, v.reason, "verdicts.reason") if v.reason else None,
                message=v.message,
            )
            for v in message.verdicts
        ),
    )


def ready_group_to_proto(ready: types.ReadyGroup) -> service_pb2.ReadyGroup:
    return service_pb2.ReadyGroup(
        group_id=ready.group_id,
        policy_version=ready.policy_version,
        prompt_index=ready.prompt_index,
        prompt_token_ids=list(ready.prompt_token_ids),
        group=group_to_proto(ready.group),
        node_id=ready.node_id,
    )


def ready_group_from_proto(message: service_pb2.ReadyGroup) -> types.ReadyGroup:
    return types.ReadyGroup(
        group_id=message.group_id,
        policy_version=message.policy_version,
        prompt_index=message.prompt_index,
        prompt_token_ids=tuple(message.prompt_token_ids),
        group=group_from_proto(message.group),
        node_id=message.node_id,
    )
