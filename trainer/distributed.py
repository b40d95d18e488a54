"""The trainer under `torchrun`: one process per device, the model sharded with FSDP2.

Without torchrun's environment the trainer is one plain process and nothing here changes
what it does. Under torchrun, rank 0 alone talks to the coordinator: it collects each
step's groups and broadcasts them; every rank builds the same batch from them and trains on
its share of the sequences (trainer/step.py), FSDP2 sums the gradients, and rank 0
publishes and checkpoints the full state that the ranks gather for it. Device and precision
come from the config: `cpu` runs on gloo, `cuda` on NCCL with each process on the GPU of its
LOCAL_RANK; the sharded master weights stay float32 and `dtype = "bfloat16"` computes in
bfloat16 (FSDP2 MixedPrecisionPolicy), gradients reduced in float32.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from protocol.codec import BF16State


@dataclass(frozen=True)
class Workers:
    """This process among the trainer's processes: rank 0 of 1 in a plain run; under torchrun,
    one of WORLD_SIZE processes that shard the model (`sharded`)."""

    rank: int = 0
    world_size: int = 1
    sharded: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE_PROCESS = Workers()


def start_workers(device: str) -> tuple[Workers, str]:
    """Join torchrun's process group, if this process was started by torchrun; this
    process's place among the workers and the device it trains on."""
    if "WORLD_SIZE" not in os.environ or "LOCAL_RANK" not in os.environ:
        return SINGLE_PROCESS, device
    import torch.distributed as dist

    local_rank = int(os.environ["LOCAL_RANK"])
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=torch.device(device))
    else:
        dist.init_process_group("gloo")
    return Workers(rank=dist.get_rank(), world_size=dist.get_world_size(), sharded=True), device


def stop_workers(workers: Workers) -> None:
    if workers.sharded:
        import torch.distributed as dist

        dist.destroy_process_group()


def load_training_model(directory: Path, *, dtype: str, device: str, workers: Workers) -> Any:
    """The model to train: as policy.model.load_model loads it in a plain run; under torchrun,
    float32 master weights sharded across the workers (each transformer block, then the
    rest), computing in `dtype`, with gradients summed (the loss is already divided by the
    global number of loss tokens). In eval mode either way: RL updates run without dropout
    (trainer/step.py target_logprobs)."""
    from policy.model import load_model, torch_dtype

    if not workers.sharded:
        return load_model(directory, dtype=dtype, device=device)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    model = load_model(directory, dtype="float32", device="cpu")
    mesh = init_device_mesh(torch.device(device).type, (workers.world_size,))
    precision = MixedPrecisionPolicy(param_dtype=torch_dtype(dtype), reduce_dtype=torch.float32)
    block_classes = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in block_classes:
            fully_shard(module, mesh=mesh, mp_policy=precision)
    fully_shard(model, mesh=mesh, mp_policy=precision)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # gloo has no pre-multiplied sum
    return model


def broadcast_from_main(workers: Workers, value: Any) -> Any:
    """Rank 0's `value` (any picklable object), on every rank."""
    if not workers.sharded:
        return value
    import torch.distributed as dist

    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def sum_across(workers: Workers, values: list[float]) -> list[float]:
    """Element-wise sums of `values` over the workers."""
    if not workers.sharded:
        return values
    import torch.distributed as dist

    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def barrier(workers: Workers) -> None:
    if workers.sharded:
        import torch.distributed as dist

        dist.barrier()


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> float:
    """Clip the gradients to `max_norm` by their global norm (over every shard) and return it."""
    total = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return float(total.full_tensor() if hasattr(total, "full_tensor") else total)


def parameter_names(model: torch.nn.Module) -> list[str]:
    """The names of the model's parameters, tied ones once (the published tensors)."""
    return [name for name, _ in model.named_parameters()]


def gather_model_state(model: torch.nn.Module, workers: Workers) -> dict[str, torch.Tensor]:
    """The full model state dict on CPU at rank 0 (empty on the other ranks); a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    assert workers.sharded
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def gather_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, workers: Workers) -> dict:
    """The full optimizer state, keyed by parameter name, at rank 0; a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    assert workers.sharded
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict,
) -> None:
    """Shard full model and optimizer states (every rank holds them) into `model` and `optimizer`.
    The model state may leave out a tied parameter's other names."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    tied_aliases = {name for name, _ in model.named_parameters(remove_duplicate=False)} - set(parameter_names(model))
    expected = set(model.state_dict()) - tied_aliases
    if missing := sorted(expected - set(model_state)):
        raise ValueError(f"the checkpoint lacks {len(missing)} tensors of the model, e.g. {missing[0]!r}")
    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=StateDictOptions(full_state_dict=True))


def published_state(model: torch.nn.Module, workers: Workers) -> BF16State | None:
    """The bf16 rounding of the model's parameters at rank 0 (None elsewhere); under
    torchrun a collective that every rank must enter."""
    from policy.weights import bf16_bits, export_bf16_state

    if not workers.sharded:
        return export_bf16_state(model)
    full = gather_model_state(model, workers)
    if not workers.is_main:
        return None
    return {name: bf16_bits(full[name]) for name in parameter_names(model)}
