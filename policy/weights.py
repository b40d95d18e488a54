"""Policy weights on a node: applying verified updates to a loaded torch model in place.

The published policy IS its bf16 state (protocol/codec.py): the trainer rounds its fp32
master weights to bfloat16 (round to nearest even) and publishes those bits. A node loads
them into its model's dtype, which must hold every bf16 value exactly (bfloat16, float32 or
float64), and keeps the bf16 state itself as numpy uint16 arrays to apply the next delta:
views into the weights where it can (NodePolicy). The model's parameters
(`named_parameters()`, tied weights once) are the state's tensors.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from protocol.codec import (
    BF16State,
    StateLayoutError,
    TensorChange,
    apply_changes_in_place,
    check_state_matches,
    state_hash,
)
from protocol.manifest import StateHashMismatchError, check_delta_base, check_keyframe_state, open_update
from protocol.types import PolicyManifest, SignedManifest, TensorSpec


def _torch() -> Any:
    import torch

    return torch


def bf16_bits(tensor: Any) -> np.ndarray:
    """The raw bits of `tensor` rounded to bfloat16 (round to nearest even), as uint16."""
    torch = _torch()
    rounded = tensor.detach().to(device="cpu", dtype=torch.bfloat16).contiguous()
    return rounded.view(torch.int16).numpy().view(np.uint16).copy()


def bf16_tensor(bits: np.ndarray) -> Any:
    """A bfloat16 CPU tensor sharing memory with the C-contiguous uint16 bit array `bits`."""
    torch = _torch()
    return torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)


def export_bf16_state(model: Any) -> BF16State:
    """The model's parameters as a bf16 state (copies; rounded if the model is wider)."""
    return {name: bf16_bits(parameter) for name, parameter in model.named_parameters()}


def model_tensor_specs(model: Any) -> tuple[TensorSpec, ...]:
    parameters = dict(model.named_parameters())
    return tuple(TensorSpec(name=name, shape=tuple(parameters[name].shape)) for name in sorted(parameters))


def _check_exact_dtype(model: Any) -> None:
    torch = _torch()
    for name, parameter in model.named_parameters():
        if parameter.dtype not in (torch.bfloat16, torch.float32, torch.float64):
            raise StateLayoutError(
                f"parameter {name!r} is {parameter.dtype}, which cannot hold bf16 weights exactly; "
                "load the model in bfloat16 or float32"
            )


def load_bf16_state(model: Any, state: BF16State) -> None:
    """Copy a whole bf16 state into the model's parameters, converting to their dtype."""
    torch = _torch()
    check_state_matches(state, model_tensor_specs(model))
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, bits in state.items():
            parameters[name].copy_(bf16_tensor(bits))


def shared_bits(parameter: Any) -> np.ndarray | None:
    """The bf16 bits of `parameter` as a uint16 array of its shape that shares its memory, so
    that writing the bits writes the weights: for a contiguous CPU bfloat16 tensor, its
    elements; for a contiguous CPU float32 tensor holding bf16 values (low halves zero), the
    high halves. None for any other tensor."""
    torch = _torch()
    if parameter.device.type != "cpu" or not parameter.is_contiguous() or sys.byteorder != "little":
        return None
    flat = parameter.detach().reshape(-1)
    if parameter.dtype == torch.bfloat16:
        return flat.view(torch.int16).numpy().view(np.uint16).reshape(tuple(parameter.shape))
    if parameter.dtype == torch.float32:
        return flat.numpy().view(np.uint16)[1::2].reshape(tuple(parameter.shape), copy=False)
    return None


def _write_elements(parameter: Any, bits: np.ndarray, flat_indices: np.ndarray) -> None:
    """Set the elements of `parameter` at `flat_indices` (C order) to those of the bf16
    state tensor `bits`."""
    torch = _torch()
    if not parameter.is_contiguous():
        with torch.no_grad():
            parameter.copy_(bf16_tensor(bits))
        return
    values = bf16_tensor(bits.reshape(-1)[flat_indices]).to(device=parameter.device, dtype=parameter.dtype)
    indices = torch.from_numpy(flat_indices).to(parameter.device)
    with torch.no_grad():
        parameter.view(-1).index_copy_(0, indices, values)


class NodePolicy:
    """A node's policy: the model, the bf16 state it holds, the version of that state and the
    state's hash.

    `apply` takes one signed update and either moves model and state to its version or
    raises a PolicyUpdateError subclass (protocol/manifest.py) and leaves both as they were
    (every check comes before the first write; should writing itself fail, e.g. out of
    memory, the node forgets its version and catches up through a keyframe). Where a parameter
    can share its memory with its bf16 bits (`shared_bits`), the state is that view, and applying a
    delta is one XOR scatter into the weights; other parameters (float64, non-contiguous, on an
    accelerator) keep their bits in a separate array and are written after it. A delta's result is
    not rehashed (protocol/manifest.py says why): `check_state_hash` does that, and the node's
    owner calls it now and then.
    """

    def __init__(self, model: Any, *, run_id: str, trainer_public_key: bytes):
        _check_exact_dtype(model)
        self.model = model
        self.run_id = run_id
        self.trainer_public_key = trainer_public_key
        self._specs = model_tensor_specs(model)
        self._parameters = dict(model.named_parameters())
        self._shared = {name: shared_bits(parameter) for name, parameter in self._parameters.items()}
        self._state: BF16State | None = None
        self._state_hash: bytes | None = None
        self._version: int | None = None
        self._num_unchecked_deltas = 0

    @property
    def version(self) -> int | None:
        """The policy version the model holds; None until a keyframe was applied."""
        return self._version

    @property
    def state(self) -> BF16State | None:
        return self._state

    @property
    def num_unchecked_deltas(self) -> int:
        """Deltas applied since the state was last hashed in full."""
        return self._num_unchecked_deltas

    def adopt(self, version: int, state: BF16State) -> None:
        """Take `state` as policy `version` (e.g. restored from the node's own disk), loading
        it into the model and hashing it."""
        new_hash = state_hash(state)
        self._write_whole_state(state)
        self._state_hash, self._version, self._num_unchecked_deltas = new_hash, version, 0

    def apply(self, signed: SignedManifest, blobs: Mapping[bytes, bytes]) -> PolicyManifest:
        """Verify and apply one update (its manifest and the blobs it lists, by hash)."""
        update = open_update(
            signed,
            blobs,
            trainer_public_key=self.trainer_public_key,
            run_id=self.run_id,
            current_version=self._version,
            current_specs=self._specs,
        )
        if update.keyframe_state is not None:
            self._write_whole_state(check_keyframe_state(update))
            self._num_unchecked_deltas = 0
        else:
            base = check_delta_base(self._state, self._state_hash, update)
            self._guarded(lambda: self._apply_changes(base, update.changes))
            self._num_unchecked_deltas += 1
        self._state_hash = update.manifest.state_hash
        self._version = update.manifest.version
        return update.manifest

    def check_state_hash(self) -> None:
        """Hash the full state (2 bytes per weight) and compare it with the hash of its
        version. On a mismatch (memory corrupted on this node, or a codec bug on either side)
        the node forgets its version, so that it catches up through a keyframe, and raises
        StateHashMismatchError."""
        if self._state is None:
            return
        if state_hash(self._state) != self._state_hash:
            version, self._version, self._state_hash = self._version, None, None
            raise StateHashMismatchError(
                f"the state held as version {version} does not have that version's hash; fetch the keyframe path"
            )
        self._num_unchecked_deltas = 0

    def _write_whole_state(self, state: BF16State) -> None:
        def write() -> None:
            load_bf16_state(self.model, state)
            self._state = {
                name: bits.copy() if self._shared[name] is None else self._shared[name] for name, bits in state.items()
            }

        self._guarded(write)

    def _apply_changes(self, state: BF16State, changes: tuple[TensorChange, ...]) -> None:
        apply_changes_in_place(state, changes)
        torch = _torch()
        with torch.no_grad():
            for change in changes:
                if self._shared[change.name] is None:
                    _write_elements(self._parameters[change.name], state[change.name], change.flat_indices)

    def _guarded(self, write: Callable[[], None]) -> None:
        """Run `write`, which changes model and state after every check passed; if it fails
        part way, what the model holds is unknown: forget the version (the next update path
        starts from a keyframe)."""
        try:
            write()
        except BaseException:
            self._state, self._state_hash, self._version = None, None, None
            raise
