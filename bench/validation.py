"""Validation cost (issue 7): validator CPU time per rollout ÷ node generation time per rollout.

One process builds the real coordinator (store, blob store, scheduler, validator) on a temporary
SQLite file with the tiny model published as version 1, plays an honest fp32 node (leases, the
torch engine with seeded sampling and commitments, submissions), then lets the validator fully
check every group: rebuild the policy from the signed update, one batched prefill over the groups
it takes at once (each prompt run once for its group), the token rule, log-prob drift, per-chunk and pooled commitments, termination. The baseline is the
node's own generation time for the same rollouts, measured in the same run. On the CPU both sides
are timed in CPU time of this (single-threaded) process, as the issue defines the figure; wall-clock
figures are printed beside them (equal on an idle machine, inflated alike by other load). With
--device cuda both run on the GPU and the figure is the wall-clock ratio (the CPU mostly waits).

Prints, last: validation-cost-ratio and floor-load-fraction (validation compute as a fraction of
node compute when a node has reached the floor sampling rate).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from policy.model import TinyModelShape  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer leases (under a minute)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (node and validator)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--hidden-size", type=int, default=TinyModelShape.hidden_size,
                        help="the model's width (the default tiny model's by default; its depth scales along)")
    parser.add_argument("--num-layers", type=int, default=TinyModelShape.num_hidden_layers)
    args = parser.parse_args()

    import torch

    from coordinator.blobstore import BlobStore
    from coordinator.config import CoordinatorConfig
    from coordinator.server import build, load_run_setup, open_coordinator_store
    from node.generate import generate_batch
    from policy.engine import TorchEngine
    from policy.model import create_tiny_model, freeze_long_lived_objects, load_model
    from policy.tokenizer import load_tokenizer
    from policy.weights import export_bf16_state, load_bf16_state
    from protocol import convert
    from protocol.identity import Identity
    from trainer.publish import PolicyPublisher

    torch.set_num_threads(1)
    num_leases = 4 if args.quick else 16
    with tempfile.TemporaryDirectory() as temp:
        root = Path(temp)
        shape = TinyModelShape(hidden_size=args.hidden_size, intermediate_size=3 * args.hidden_size,
                               num_hidden_layers=args.num_layers, num_attention_heads=max(4, args.hidden_size // 64))
        create_tiny_model(root / "model", shape=shape)
        trainer = Identity.generate()
        model = load_model(root / "model", dtype=args.dtype, device=args.device)
        freeze_long_lived_objects()  # as the node daemon does once its model is loaded
        blobs = BlobStore(root / "data" / "policy", run_id="demo", trainer_public_key=trainer.public_key)
        PolicyPublisher(trainer, "demo", blobs).publish_model(1, model)
        load_bf16_state(model, export_bf16_state(model))
        config = CoordinatorConfig.model_validate({
            "data_dir": str(root / "data"),
            "trainer_key_fingerprint": trainer.key_id,
            "run": {"model": str(root / "model"), "group_size": 8, "prompts_per_lease": 4,
                    "sampling": {"max_tokens": args.max_tokens}},
            "lease": {"max_open_per_node": num_leases},
            "validation": {"device": args.device},
        })
        setup = load_run_setup(config)
        store = open_coordinator_store(config)
        built = build(config, setup, store)
        app, validator = built.app, built.validator
        node = Identity.generate()
        engine_name = f"torch-{args.device}-{args.dtype}"
        app.register(node.key_id, node.public_key, "bench", engine_name, args.device, "bench")
        tokenizer = load_tokenizer(root / "model")
        engine = TorchEngine(model, stop_token_ids={tokenizer.eos_token_id}, max_batch_size=32)
        generation_s = generation_wall_s = 0.0
        num_rollouts = num_tokens = 0
        for _ in range(num_leases):
            lease = app.lease(node.key_id, 1)
            started, started_wall = time.process_time(), time.perf_counter()
            generated = generate_batch(engine, tokenizer, setup.task, config.run.seed, lease, engine_name)
            generation_s += time.process_time() - started
            generation_wall_s += time.perf_counter() - started_wall
            num_rollouts += sum(len(g.rollouts) for g in generated.batch.groups)
            num_tokens += generated.num_tokens
            result = app.submit(node.key_id, convert.batch_to_proto(generated.batch).SerializeToString())
            assert result.receipt.num_rejected == 0, result.receipt
        validator.run_pending(limit=1)  # loads the validator's model and rebuilds the policy once
        started, started_wall = time.process_time(), time.perf_counter()
        while validator.run_pending(limit=64):
            pass
        validation_s = time.process_time() - started
        validation_wall_s = time.perf_counter() - started_wall
        results = [r for r in store.list_validations(node.key_id, 10_000)]
        store.close()
    assert all(r.passed for r in results), [r.evidence_json for r in results if not r.passed][:2]
    ratio = validation_s / generation_s if args.device == "cpu" else validation_wall_s / generation_wall_s
    floor_rate = config.validation.floor_rate
    print(json.dumps({
        "rollouts": num_rollouts, "tokens": num_tokens, "groups_checked": len(results),
        "generation_ms_per_rollout": round(1000 * generation_s / num_rollouts, 2),
        "validation_ms_per_rollout": round(1000 * validation_s / num_rollouts, 2),
        "wall_clock_ratio": round(validation_wall_s / generation_wall_s, 3),
    }))
    print(f"validation-cost-ratio: {ratio:.3f} (target: <= 0.1)")
    print(f"floor-load-fraction: {floor_rate * ratio:.4f} (validation compute ÷ node compute at the {floor_rate:.0%} floor)")


if __name__ == "__main__":
    main()
