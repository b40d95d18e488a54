"""Subcommands of `rollproof`. Each module defines `register(subparsers)`; it must import
nothing heavy at module level (torch, transformers, grpc) so `--help` stays instant."""

COMMAND_MODULES = [
    "rollproof.commands.version",
    "rollproof.commands.keygen",
    "rollproof.commands.certs",
    "rollproof.commands.config",
    "rollproof.commands.bootstrap",
    "rollproof.commands.coordinator",
    "rollproof.commands.node",
    "rollproof.commands.trainer",
    "rollproof.commands.eval",
    "rollproof.commands.up",
    "rollproof.commands.admin",
    "rollproof.commands.validator",
]
