"""Trainer checkpoints: model, optimizer, step, RNG state and which groups each step used.

A checkpoint is a directory `step-<step, 8 digits>/` written under a temporary name and renamed
into place, so a crash mid-write leaves the previous checkpoint as the newest complete one.
Under torchrun (trainer/distributed.py) the ranks gather the full model and optimizer state
and rank 0 writes it, the optimizer's keyed by parameter name (`optimizer_by_name`), so that a
torchrun of any number of processes resumes it; a plain run's optimizer state is keyed by
position (`optimizer`), and each kind of run resumes only its own kind.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from trainer.distributed import (
    SINGLE_PROCESS,
    Workers,
    barrier,
    gather_model_state,
    gather_optimizer_state,
    load_full_state,
    parameter_names,
)

_PREFIX = "step-"


@dataclass
class TrainerState:
    step: int = 0
    latest_published_version: int = 0
    consumed_groups: dict[int, list[str]] = field(default_factory=dict)  # step → group ids
    num_groups_stale: int = 0


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_checkpoint(
    directory: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainerState,
    *,
    keep: int = 3,
    workers: Workers = SINGLE_PROCESS,
) -> Path:
    """Write a checkpoint of `state.step`; under torchrun every rank calls this, rank 0 writes."""
    if workers.sharded:
        model_state = gather_model_state(model, workers)
        optimizer_extra = {"optimizer_by_name": gather_optimizer_state(model, optimizer, workers)}
    else:
        model_state, optimizer_extra = None, {"optimizer": optimizer.state_dict()}
    directory = Path(directory)
    final = directory / f"{_PREFIX}{state.step:08d}"
    if workers.is_main:
        _write(directory, final, model, model_state, optimizer_extra, state, keep)
    barrier(workers)
    return final


def _write(
    directory: Path,
    final: Path,
    model: torch.nn.Module,
    model_state: dict[str, torch.Tensor] | None,
    optimizer_extra: dict,
    state: TrainerState,
    keep: int,
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    temp = directory / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir()
    if model_state is None:
        save_model(model, str(temp / "model.safetensors"))
    else:
        kept = set(parameter_names(model)) | {name for name, _ in model.named_buffers()}
        save_file(
            {name: tensor.contiguous() for name, tensor in model_state.items() if name in kept},
            str(temp / "model.safetensors"),
        )
    torch.save({**optimizer_extra, "rng": _rng_state()}, temp / "optimizer.pt")
    (temp / "state.json").write_text(
        json.dumps(
            {
                "step": state.step,
                "latest_published_version": state.latest_published_version,
                "consumed_groups": {str(k): v for k, v in state.consumed_groups.items()},
                "num_groups_stale": state.num_groups_stale,
            }
        )
    )
    for path in temp.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(temp, final)
    for old in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(directory: Path) -> list[Path]:
    directory = Path(directory)
    if not directory.exists():
        return []
    return sorted(p for p in directory.iterdir() if p.name.startswith(_PREFIX) and (p / "state.json").exists())


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, workers: Workers = SINGLE_PROCESS
) -> TrainerState:
    """Restore model, optimizer and RNG from `path` and return the trainer state (under
    torchrun, every rank calls this)."""
    path = Path(path)
    extra = torch.load(path / "optimizer.pt", weights_only=False)
    written_sharded = "optimizer_by_name" in extra
    if written_sharded != workers.sharded:
        raise ValueError(
            f"checkpoint {path} was written by a {'torchrun' if written_sharded else 'single-process'} trainer; "
            f"resume it {'under torchrun' if written_sharded else 'without torchrun'}, or start another data_dir"
        )
    if workers.sharded:
        load_full_state(model, optimizer, load_file(str(path / "model.safetensors")), extra["optimizer_by_name"])
    else:
        load_model(model, str(path / "model.safetensors"), device=str(next(model.parameters()).device))
        optimizer.load_state_dict(extra["optimizer"])
    _restore_rng(extra["rng"])
    raw = json.loads((path / "state.json").read_text())
    return TrainerState(
        step=raw["step"],
        latest_published_version=raw["latest_published_version"],
        consumed_groups={int(k): v for k, v in raw["consumed_groups"].items()},
        num_groups_stale=raw["num_groups_stale"],
    )
