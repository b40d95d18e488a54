"""Typed configuration loading for every role.

Precedence, lowest first: the model's defaults → a TOML file → `ROLLPROOF_<ROLE>_<KEY>`
environment variables (nested keys joined by `__`, e.g. `ROLLPROOF_NODE_ENGINE__BATCH_SIZE`)
→ command-line overrides. Unknown keys and bad values raise ConfigError naming the key.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

ModelT = TypeVar("ModelT", bound=BaseModel)


class ConfigError(ValueError):
    """The configuration could not be loaded; the message names the key and the source."""


def _set_nested(target: dict[str, Any], dotted_key: str, value: Any) -> None:
    *parents, leaf = dotted_key.split(".")
    node = target
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted_key}: {part!r} is a value, not a section")
        node = child
    node[leaf] = value


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def env_overrides(role: str, environ: Mapping[str, str]) -> dict[str, Any]:
    prefix = f"ROLLPROOF_{role.upper()}_"
    values: dict[str, Any] = {}
    for name, value in environ.items():
        if name.startswith(prefix):
            _set_nested(values, name[len(prefix) :].lower().replace("__", "."), value)
    return values


def parse_assignment(assignment: str) -> tuple[str, Any]:
    """Parse a `--set key.sub=value` override; the value is read as TOML when it can be."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value


def _known_keys(model_cls: type[BaseModel], location: tuple[int | str, ...]) -> list[str]:
    """The keys of the section that holds `location`'s last part."""
    section = model_cls
    for part in location[:-1]:
        field = section.model_fields.get(str(part))
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        section = annotation
    return list(section.model_fields)


def _describe(error: ValidationError, sources: str, model_cls: type[BaseModel]) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(root)"
        if item["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(item["loc"][-1]), _known_keys(model_cls, item["loc"]), n=1)
            parent = ".".join(str(part) for part in item["loc"][:-1])
            suggestion = f"{parent}.{close[0]}" if parent and close else close[0] if close else ""
            lines.append(f"{key}: unknown key" + (f"; did you mean {suggestion!r}?" if suggestion else ""))
        else:
            lines.append(f"{key}: {item['msg']} (got {item.get('input')!r})")
    return f"invalid configuration ({sources}):\n  " + "\n  ".join(lines)


def load_config(
    model_cls: type[ModelT],
    role: str,
    *,
    config_file: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> ModelT:
    """Build `model_cls` from defaults, `config_file`, the environment and `overrides`.

    `overrides` maps dotted keys (`engine.batch_size`) to values; None values are skipped,
    so unset CLI flags fall through to lower-precedence sources.
    """
    data: dict[str, Any] = {}
    sources = ["defaults"]
    if config_file is not None:
        path = Path(config_file)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"config file {path} is not valid TOML: {error}") from None
        sources.append(str(path))
    environment = env_overrides(role, os.environ if environ is None else environ)
    if environment:
        data = _merge(data, environment)
        sources.append(f"ROLLPROOF_{role.upper()}_* environment")
    flag_values: dict[str, Any] = {}
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_nested(flag_values, key, value)
    if flag_values:
        data = _merge(data, flag_values)
        sources.append("command line")
    try:
        return model_cls.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_describe(error, " → ".join(sources), model_cls)) from None
