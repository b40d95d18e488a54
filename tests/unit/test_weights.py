import dataclasses

import numpy as np
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from policy.weights import (
    NodePolicy,
    bf16_bits,
    export_bf16_state,
    load_bf16_state,
    model_tensor_specs,
    shared_bits,
)
from protocol import codec, manifest
from protocol.codec import StateLayoutError
from protocol.identity import Identity
from protocol.manifest import BaseStateMismatchError, BlobHashError, MissingBaseError, StateHashMismatchError

RUN = "run-weights"
TRAINER = Identity.from_seed(bytes([3]) * 32)


def tiny_qwen2(seed, dtype=torch.float32, hidden_size=32):
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=96,
        hidden_size=hidden_size,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(config).to(dtype)


def trainer_versions(num_versions, lr=1e-3):
    """bf16 states published by a trainer with fp32 master weights taking AdamW steps."""
    model = tiny_qwen2(seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    states = [export_bf16_state(model)]
    for _ in range(num_versions - 1):
        tokens = torch.randint(0, 96, (4, 16))
        logits = model(tokens).logits[:, :-1].reshape(-1, 96)
        loss = torch.nn.functional.cross_entropy(logits, tokens[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        states.append(export_bf16_state(model))
    return states


def blob_map(update):
    return {ref.hash: blob for ref, blob in zip(update.manifest.blobs, update.blobs, strict=True)}


def signed_keyframe(state, version):
    update = manifest.build_keyframe(RUN, version, state)
    return manifest.sign_manifest(TRAINER, update.manifest), blob_map(update)


def signed_delta(base, state, version):
    update = manifest.build_delta(RUN, version, version - 1, base, state)
    return manifest.sign_manifest(TRAINER, update.manifest), blob_map(update)


def snapshot(model):
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters()}


def assert_model_holds(model, state):
    assert codec.state_hash(export_bf16_state(model)) == codec.state_hash(state)
    for name, parameter in model.named_parameters():
        widened = torch.from_numpy(state[name].view(np.int16)).view(torch.bfloat16).to(parameter.dtype)
        assert torch.equal(parameter.detach(), widened), name


@pytest.fixture(scope="module")
def versions():
    return trainer_versions(4)


def test_bf16_bits_round_to_nearest_even():
    values = torch.tensor([1.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, -2.5, 1e-40], dtype=torch.float32)
    bits = bf16_bits(values)
    expected = values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(bits, expected)
    assert bits[1] == 0x3F80 and bits[2] == 0x3F82


def test_export_dedupes_tied_weights_and_load_round_trips():
    model = tiny_qwen2(seed=1)
    state = export_bf16_state(model)
    assert "lm_head.weight" not in state and "model.embed_tokens.weight" in state
    assert [spec.name for spec in model_tensor_specs(model)] == sorted(state)
    other = tiny_qwen2(seed=2)
    load_bf16_state(other, state)
    assert_model_holds(other, state)


def with_transposed_storage(model):
    """The model with one weight held in a non-contiguous (transposed) tensor."""
    layer = model.model.layers[0].mlp.down_proj
    layer.weight = torch.nn.Parameter(layer.weight.detach().t().contiguous().t())
    assert not layer.weight.is_contiguous()
    return model


@pytest.mark.parametrize(
    "make_model",
    [
        lambda: tiny_qwen2(seed=5),
        lambda: tiny_qwen2(seed=5, dtype=torch.bfloat16),
        lambda: tiny_qwen2(seed=5, dtype=torch.float64),
        lambda: with_transposed_storage(tiny_qwen2(seed=5)),
    ],
    ids=["float32", "bfloat16", "float64", "non-contiguous"],
)
def test_node_follows_keyframe_and_deltas_in_place(versions, make_model):
    model = make_model()
    node = NodePolicy(model, run_id=RUN, trainer_public_key=TRAINER.public_key)
    parameters_before = {name: parameter.data_ptr() for name, parameter in model.named_parameters()}
    node.apply(*signed_keyframe(versions[0], 1))
    assert_model_holds(model, versions[0])
    for version in range(2, len(versions) + 1):
        node.apply(*signed_delta(versions[version - 2], versions[version - 1], version))
        assert node.version == version
        assert_model_holds(model, versions[version - 1])
        assert codec.state_hash(node.state) == codec.state_hash(versions[version - 1])
    assert {name: parameter.data_ptr() for name, parameter in model.named_parameters()} == parameters_before
    node.check_state_hash()


def test_state_shares_memory_with_bfloat16_and_float32_weights():
    for dtype in (torch.bfloat16, torch.float32):
        weight = torch.tensor([[1.0, -2.5, 3.0], [0.5, 0.0, -1.0]], dtype=dtype)
        bits = shared_bits(weight)
        assert bits.shape == (2, 3)
        np.testing.assert_array_equal(bits, bf16_bits(weight))
        bits[0, 1] = 0x4000  # bf16 2.0
        assert weight[0, 1].item() == 2.0
    assert shared_bits(torch.zeros(3, dtype=torch.float64)) is None
    assert shared_bits(torch.zeros(3, 2).t()) is None


def test_full_state_check_catches_a_lying_manifest_and_local_corruption(versions):
    model = tiny_qwen2(seed=5)
    node = NodePolicy(model, run_id=RUN, trainer_public_key=TRAINER.public_key)
    node.apply(*signed_keyframe(versions[0], 1))
    update = manifest.build_delta(RUN, 2, 1, versions[0], versions[1])
    lying = manifest.sign_manifest(TRAINER, dataclasses.replace(update.manifest, state_hash=bytes(32)))
    node.apply(lying, blob_map(update))
    assert node.num_unchecked_deltas == 1
    with pytest.raises(StateHashMismatchError, match="fetch the keyframe path"):
        node.check_state_hash()
    assert node.version is None
    node.apply(*signed_keyframe(versions[1], 2))
    node.check_state_hash()
    assert node.num_unchecked_deltas == 0

    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 4] *= 2
    with pytest.raises(StateHashMismatchError):
        node.check_state_hash()


def test_refused_updates_leave_model_and_state_untouched(versions):
    model = tiny_qwen2(seed=5)
    node = NodePolicy(model, run_id=RUN, trainer_public_key=TRAINER.public_key)
    node.apply(*signed_keyframe(versions[0], 1))
    before_parameters, before_state = snapshot(model), codec.state_hash(node.state)

    signed, blobs = signed_delta(versions[0], versions[1], 2)
    first = next(iter(blobs))
    flipped = bytearray(blobs[first])
    flipped[0] ^= 0x80
    with pytest.raises(BlobHashError):
        node.apply(signed, {**blobs, first: bytes(flipped)})

    update = manifest.build_keyframe(RUN, 2, versions[1])
    lying = manifest.sign_manifest(TRAINER, dataclasses.replace(update.manifest, state_hash=bytes(32)))
    with pytest.raises(StateHashMismatchError):
        node.apply(lying, blob_map(update))

    with pytest.raises(BaseStateMismatchError):
        node.apply(*signed_delta(versions[2], versions[1], 2))

    with pytest.raises(MissingBaseError):
        node.apply(*signed_delta(versions[1], versions[2], 3))

    assert node.version == 1 and codec.state_hash(node.state) == before_state
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter.detach(), before_parameters[name]), name


def test_model_that_cannot_hold_the_policy_is_refused(versions):
    with pytest.raises(StateLayoutError, match="cannot hold bf16 weights exactly"):
        NodePolicy(tiny_qwen2(seed=0, dtype=torch.float16), run_id=RUN, trainer_public_key=TRAINER.public_key)
    wider = NodePolicy(tiny_qwen2(seed=0, hidden_size=64), run_id=RUN, trainer_public_key=TRAINER.public_key)
    with pytest.raises(StateLayoutError, match="differs from this node's model"):
        wider.apply(*signed_keyframe(versions[0], 1))


def test_adopt_a_state_from_disk(versions):
    model = tiny_qwen2(seed=9)
    node = NodePolicy(model, run_id=RUN, trainer_public_key=TRAINER.public_key)
    node.adopt(1, versions[0])
    assert_model_holds(model, versions[0])
    node.apply(*signed_delta(versions[0], versions[1], 2))
    assert_model_holds(model, versions[1])
