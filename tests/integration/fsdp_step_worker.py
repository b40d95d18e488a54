"""One FSDP2 training step, run by torchrun from test_trainer_torchrun.py: every rank trains on
its shard of the pickled groups; rank 0 writes the full updated weights and the step's metrics."""

import argparse
import pickle
from pathlib import Path

import torch

from trainer.config import LossSection, OptimizerSection
from trainer.distributed import gather_model_state, load_training_model, parameter_names, start_workers, stop_workers
from trainer.step import make_optimizer, train_step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--groups", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--grad-clip", type=float, required=True)
    args = parser.parse_args()
    workers, device = start_workers("cpu")
    try:
        model = load_training_model(args.model, dtype="float32", device=device, workers=workers)
        optimizer = make_optimizer(model, OptimizerSection(lr=args.lr))
        metrics = train_step(
            model,
            optimizer,
            pickle.loads(args.groups.read_bytes()),
            current_version=1,
            temperature=1.0,
            pad_token_id=0,
            loss_config=LossSection(),
            grad_clip=args.grad_clip,
            workers=workers,
        )
        state = gather_model_state(model, workers)
        if workers.is_main:
            weights = {name: state[name] for name in parameter_names(model)}
            torch.save({"weights": weights, "metrics": metrics.as_dict()}, args.out)
    finally:
        stop_workers(workers)


if __name__ == "__main__":
    main()
