from __future__ import annotations

import argparse
from pathlib import Path

from rollproof.commands.config import add_config_arguments, load_role_config


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("trainer", help="run the RL trainer")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    run = actions.add_parser("run", help="train on accepted groups and publish signed policy versions")
    add_config_arguments(run)
    run.add_argument("--coordinator", help="coordinator gRPC address HOST:PORT")
    run.add_argument(
        "--coordinator-ca", type=Path, help="PEM file of the CA (or self-signed certificate) of the coordinator's TLS"
    )
    run.add_argument(
        "--coordinator-fingerprint", help="SHA-256 fingerprint of the coordinator's TLS certificate (pinned)"
    )
    run.add_argument("--model", type=Path, help="initial model directory")
    run.add_argument("--data-dir", type=Path, help="key, checkpoints, metrics (default ~/.rollproof/trainer)")
    run.add_argument(
        "--key-file",
        type=Path,
        help="the policy signing key (must exist; default <data-dir>/trainer.key, created on first start)",
    )
    run.add_argument("--max-steps", type=int, help="stop after this many steps (0: run until stopped)")
    run.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the data dir")
    run.set_defaults(func=run_trainer)
    export = actions.add_parser(
        "export", help="write a published policy version, rebuilt from the coordinator's policy store, as an HF model"
    )
    add_config_arguments(export)
    export.add_argument("--policy-dir", type=Path, required=True, help="the store: <coordinator data_dir>/policy")
    export.add_argument("--version", type=int, help="policy version to export (default: the newest stored)")
    export.add_argument("--out", type=Path, required=True, help="new model directory to write")
    export.add_argument("--model", type=Path, help="the run's base model directory (config, tokenizer)")
    export.add_argument(
        "--data-dir", type=Path, help="the trainer's data dir, whose key the versions are checked against"
    )
    export.add_argument("--key-file", type=Path, help="the trainer's key file the versions are checked against")
    export.add_argument(
        "--trainer-key-fingerprint",
        help="check the versions against this trainer key id instead of the trainer's key file",
    )
    export.add_argument(
        "--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="dtype of the weights written"
    )
    export.set_defaults(func=export_version)


def run_trainer(args: argparse.Namespace) -> int:
    import signal

    from trainer.main import Trainer

    config = load_role_config(
        "trainer",
        args,
        {
            "coordinator": args.coordinator,
            "coordinator_ca": args.coordinator_ca,
            "coordinator_fingerprint": args.coordinator_fingerprint,
            "model": args.model,
            "data_dir": args.data_dir,
            "key_file": args.key_file,
            "max_steps": args.max_steps,
        },
    )
    trainer = Trainer(config, resume=args.resume)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: trainer.stop_event.set())
    if trainer.identity is not None:
        print(f"trainer key id: {trainer.identity.key_id}", flush=True)
    trainer.run()
    return 0


def export_version(args: argparse.Namespace) -> int:
    from protocol.identity import Identity, public_key_from_key_id
    from trainer.export import export_model, latest_stored_version, rebuild_version

    config = load_role_config(
        "trainer", args, {"model": args.model, "data_dir": args.data_dir, "key_file": args.key_file}
    )
    if config.model is None:
        raise ValueError("the base model is not set: pass --model, the directory the run started from")
    if args.trainer_key_fingerprint:
        trainer_public_key = public_key_from_key_id(args.trainer_key_fingerprint)
    else:
        trainer_public_key = Identity.load((config.key_file or config.data_dir / "trainer.key").expanduser()).public_key
    version = latest_stored_version(args.policy_dir) if args.version is None else args.version
    state, manifest = rebuild_version(args.policy_dir, version, trainer_public_key)
    export_model(state, config.model, args.out, dtype=args.dtype)
    print(f"exported policy version {version} of run {manifest.run_id} to {args.out}", flush=True)
    return 0
