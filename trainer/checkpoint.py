"""Trainer checkpoints: model, optimizer, step, RNG state and which groups each step used.

A checkpoint is a directory `step-<step, 8 digits>/` written under a temporary name and renamed
into place, so a crash mid-write leaves the previous checkpoint as the newest complete one.
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
from safetensors.torch import load_model, save_model

_PREFIX = "step-"


@dataclass
class TrainerState:
    step: int = 0
    latest_published_version: int = 0
    consumed_groups: dict[int, list[str]] = field(default_factory=dict)   # step → group ids
    num_groups_stale: int = 0


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_checkpoint(
    directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: TrainerState, *, keep: int = 3
) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{_PREFIX}{state.step:08d}"
    temp = directory / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir()
    save_model(model, str(temp / "model.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "rng": _rng_state()}, temp / "optimizer.pt")
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
    return final


def list_checkpoints(directory: Path) -> list[Path]:
    directory = Path(directory)
    if not directory.exists():
        return []
    return sorted(p for p in directory.iterdir() if p.name.startswith(_PREFIX) and (p / "state.json").exists())


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> TrainerState:
    """Restore model, optimizer and RNG from `path` and return the trainer state."""
    path = Path(path)
    load_model(model, str(path / "model.safetensors"), device=str(next(model.parameters()).device))
    extra = torch.load(path / "optimizer.pt", weights_only=False)
    optimizer.load_state_dict(extra["optimizer"])
    _restore_rng(extra["rng"])
    raw = json.loads((path / "state.json").read_text())
    return TrainerState(
        step=raw["step"],
        latest_published_version=raw["latest_published_version"],
        consumed_groups={int(k): v for k, v in raw["consumed_groups"].items()},
        num_groups_stale=raw["num_groups_stale"],
    )
