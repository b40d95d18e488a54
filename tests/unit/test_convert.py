"""Round trip of every domain type through its protobuf message and the wire bytes."""

import pytest

from protocol import convert, types
from protocol.proto import policy_pb2, rollout_pb2, service_pb2


def _rollout(sample_index: int, num_tokens: int) -> types.Rollout:
    mask = tuple(i % 3 != 2 for i in range(num_tokens))
    return types.Rollout(
        sample_index=sample_index,
        token_ids=tuple(range(5, 5 + num_tokens)),
        sampled_mask=mask,
        logprobs=tuple(-0.5 * (i + 1) for i in range(sum(mask))),
        commitment=bytes(range(40)),
        finish_reason=types.FinishReason.STOP,
        claimed_reward=0.75,
    )


MANIFEST = types.PolicyManifest(
    run_id="run-1",
    version=7,
    base_version=6,
    codec=types.Codec.DELTA,
    tensors=(types.TensorSpec("model.embed_tokens.weight", (64, 128)), types.TensorSpec("lm_head.weight", (64, 128))),
    blobs=(types.BlobRef(hash=b"\x01" * 32, size=1000, uncompressed_size=4000),),
    state_hash=b"\x02" * 32,
    created_at_ms=1_800_000_000_000,
)
LEASE = types.WorkLease(
    lease_id="lease-9",
    node_id="12D3KooWnode",
    task="addition",
    policy_version=3,
    prompts=(types.LeasedPrompt(12, "1+2=", (4, 5, 6, 7)), types.LeasedPrompt(99, "30+4=", (8, 9))),
    group_size=8,
    sampling=types.SamplingParams(temperature=0.5, top_k=10, top_p=0.5, max_tokens=16),
    sampling_seed=2**63 - 1,
    deadline_ms=1_800_000_060_000,
)
BATCH = types.RolloutBatch(
    lease_id="lease-9",
    policy_version=3,
    groups=(types.RolloutGroup(12, (_rollout(0, 9), _rollout(1, 16))), types.RolloutGroup(99, (_rollout(0, 0),))),
    engine="torch-cpu-float32",
)
RECEIPT = types.Receipt(
    lease_id="lease-9",
    batch_hash=b"\x03" * 32,
    verdicts=(
        types.RolloutVerdict(12, 0, True),
        types.RolloutVerdict(12, 1, False, types.RejectReason.REWARD_MISMATCH, "claimed 1.0, verifier says 0.0"),
    ),
)
READY = types.ReadyGroup(
    group_id="g-1", policy_version=3, prompt_index=12, prompt_token_ids=(4, 5), group=BATCH.groups[0], node_id="n"
)
SIGNED = types.SignedManifest(manifest_bytes=b"manifest", signer_public_key=b"\x04" * 32, signature=b"\x05" * 64)

CASES = [
    (MANIFEST, convert.manifest_to_proto, convert.manifest_from_proto, policy_pb2.PolicyManifest),
    (SIGNED, convert.signed_manifest_to_proto, convert.signed_manifest_from_proto, policy_pb2.SignedManifest),
    (LEASE, convert.lease_to_proto, convert.lease_from_proto, rollout_pb2.WorkLease),
    (BATCH, convert.batch_to_proto, convert.batch_from_proto, rollout_pb2.RolloutBatch),
    (RECEIPT, convert.receipt_to_proto, convert.receipt_from_proto, rollout_pb2.Receipt),
    (READY, convert.ready_group_to_proto, convert.ready_group_from_proto, service_pb2.ReadyGroup),
    (LEASE.sampling, convert.sampling_to_proto, convert.sampling_from_proto, rollout_pb2.SamplingParams),
]


@pytest.mark.parametrize(
    ("value", "to_proto", "from_proto", "message_cls"), CASES, ids=lambda c: getattr(c, "__name__", "")
)
def test_round_trip_through_wire_bytes(value, to_proto, from_proto, message_cls):
    wire = to_proto(value).SerializeToString()
    assert from_proto(message_cls.FromString(wire)) == value


def test_receipt_counts_travel():
    message = convert.receipt_to_proto(RECEIPT)
    assert (message.num_accepted, message.num_rejected) == (1, 1)


@pytest.mark.parametrize("num_tokens", [0, 1, 7, 8, 9, 64, 65])
def test_mask_packing(num_tokens):
    mask = tuple(bool((i * 7) % 5 % 2) for i in range(num_tokens))
    packed = convert.pack_mask(mask)
    assert len(packed) == (num_tokens + 7) // 8
    assert convert.unpack_mask(packed, num_tokens) == mask
    assert packed == bytes(
        sum(mask[i] << (i % 8) for i in range(start, min(start + 8, num_tokens))) for start in range(0, num_tokens, 8)
    )


def test_mask_of_wrong_length_or_with_padding_bits_is_refused():
    with pytest.raises(convert.WireFormatError, match="sampled_mask"):
        convert.unpack_mask(b"\xff\xff", 3)
    with pytest.raises(convert.WireFormatError, match="padding bits"):
        convert.unpack_mask(b"\xff", 3)


def test_unknown_enum_value_names_the_field():
    message = convert.rollout_to_proto(_rollout(0, 3))
    message.finish_reason = 42
    with pytest.raises(convert.WireFormatError, match="finish_reason: 42"):
        convert.rollout_from_proto(message)
