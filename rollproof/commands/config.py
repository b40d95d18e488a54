from __future__ import annotations

import argparse
from pathlib import Path

ROLE_MODELS = {
    "coordinator": "coordinator.config:CoordinatorConfig",
    "node": "node.config:NodeConfig",
    "trainer": "trainer.config:TrainerConfig",
}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every role shares: a TOML file and dotted-key overrides."""
    parser.add_argument("--config", type=Path, help="TOML config file")
    parser.add_argument(
        "--set",
        dest="assignments",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one key (dotted for sections, e.g. engine.threads=2); repeatable",
    )


def load_role_config(role: str, args: argparse.Namespace, flag_overrides: dict | None = None):
    """Load `role`'s config from args.config, the environment, --set and explicit flags."""
    import importlib

    from rollproof.config import load_config, parse_assignment

    module_name, class_name = ROLE_MODELS[role].split(":")
    model_cls = getattr(importlib.import_module(module_name), class_name)
    overrides = dict(parse_assignment(a) for a in args.assignments)
    # an unset flag (None) leaves a --set of the same key in place
    overrides.update({key: value for key, value in (flag_overrides or {}).items() if value is not None})
    return load_config(model_cls, role, config_file=args.config, overrides=overrides)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("config", help="inspect configuration")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = actions.add_parser("show", help="print a role's effective configuration as JSON")
    show.add_argument("role", choices=sorted(ROLE_MODELS))
    add_config_arguments(show)
    show.set_defaults(func=run_show)


def run_show(args: argparse.Namespace) -> int:
    import json

    config = load_role_config(args.role, args)
    print(json.dumps(_without_passwords(config.model_dump(mode="json")), indent=2))
    return 0


def _without_passwords(value):
    """The config with the password of every URL (a PostgreSQL store.url) replaced by ***."""
    from urllib.parse import urlsplit

    if isinstance(value, dict):
        return {key: _without_passwords(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_passwords(item) for item in value]
    if isinstance(value, str) and "://" in value:
        parts = urlsplit(value)
        if parts.password:
            return value.replace(f":{parts.password}@", ":***@", 1)
    return value
