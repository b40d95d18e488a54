"""Policy weights on a node: applying verified updates to a loaded torch model in place.

The published policy IS its bf16 state (protocol/codec.py): the trainer rounds its fp32
master weights to bfloat16 (round to nearest even) and publishes those bits. A node loads
them into its model's dtype, which must hold every bf16 value exactly (bfloat16, float32 or
float64), and keeps the bf16 state itself as numpy uint16 arrays to apply the next delta.
The model's parameters (`named_parameters()`, tied weights once) are the state's tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from protocol.codec import BF16State, StateLayoutError, TensorChange, apply_changes_in_place, check_state_matches
from protocol.manifest import OpenedUpdate, apply_update, open_update
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


def _write_elements(parameter: Any, bits: np.ndarray, flat_indices: np.ndarray) -> None:
    """Set the elements of `parameter` at `flat_indices` (C order) to those of the bf16
    state tensor `bits`."""
    torch = _torch()
    if not parameter.is_contiguous():
        with torch.no_grad():
            parameter.copy_(bf16_tensor(bits))
        return
    new_bits = bits.reshape(-1)[flat_indices]
    if parameter.device.type == "cpu":
        # Scatter through a numpy view of the parameter's memory: several times faster than
        # index_copy_ on CPU (autograd's version counter is not bumped; a node only runs
        # inference). A float32 whose high half is the bf16 bits and low half zero is the
        # same value.
        if parameter.dtype == torch.float32:
            target = parameter.detach().numpy().view(np.uint32).reshape(-1)
            target[flat_indices] = new_bits.astype(np.uint32) << 16
            return
        if parameter.dtype == torch.bfloat16:
            target = parameter.detach().view(torch.int16).numpy().view(np.uint16).reshape(-1)
            target[flat_indices] = new_bits
            return
    values = bf16_tensor(new_bits).to(device=parameter.device, dtype=parameter.dtype)
    indices = torch.from_numpy(flat_indices).to(parameter.device)
    with torch.no_grad():
        parameter.view(-1).index_copy_(0, indices, values)


def _write_changes(model: Any, state: BF16State, changes: tuple[TensorChange, ...]) -> None:
    parameters = dict(model.named_parameters())
    for change in changes:
        _write_elements(parameters[change.name], state[change.name], change.flat_indices)


class NodePolicy:
    """A node's policy: the model, the bf16 state it holds, and the version of that state.

    `apply` takes one signed update and either moves model and state to its version or
    raises a PolicyUpdateError subclass (protocol/manifest.py) and leaves both as they were.
    """

    def __init__(self, model: Any, *, run_id: str, trainer_public_key: bytes):
        _check_exact_dtype(model)
        self.model = model
        self.run_id = run_id
        self.trainer_public_key = trainer_public_key
        self._specs = model_tensor_specs(model)
        self._state: BF16State | None = None
        self._version: int | None = None

    @property
    def version(self) -> int | None:
        """The policy version the model holds; None until a keyframe was applied."""
        return self._version

    @property
    def state(self) -> BF16State | None:
        return self._state

    def adopt(self, version: int, state: BF16State) -> None:
        """Take `state` as policy `version` (e.g. restored from the node's own disk), loading
        it into the model."""
        load_bf16_state(self.model, state)
        self._state = {name: state[name].copy() for name in state}
        self._version = version

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
        new_state = apply_update(self._state, update)
        try:
            self._write_model(new_state, update)
        except BaseException:
            self._restore_model(new_state, update)
            raise
        self._state = new_state
        self._version = update.manifest.version
        return update.manifest

    def _write_model(self, new_state: BF16State, update: OpenedUpdate) -> None:
        torch = _torch()
        with torch.no_grad():
            if update.keyframe_state is not None:
                load_bf16_state(self.model, new_state)
            else:
                _write_changes(self.model, new_state, update.changes)

    def _restore_model(self, new_state: BF16State, update: OpenedUpdate) -> None:
        if update.keyframe_state is None:
            apply_changes_in_place(new_state, update.changes)
            _write_changes(self.model, new_state, update.changes)
        elif self._state is not None:
            load_bf16_state(self.model, self._state)
