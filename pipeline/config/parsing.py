"""Reading settings: ``--set key=value`` overrides, YAML mappings into typed dataclasses, sizes.

Split from :mod:`pipeline.config` so the settings themselves stay readable in one place.
"""
from __future__ import annotations

import copy
import dataclasses
import re
import typing
from typing import Any, Mapping

import yaml


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and the value."""


def local_path_of(uri: str) -> str | None:
    """The local filesystem path of ``uri`` (plain path, file:// or Hadoop's file:/), else None."""
    if uri.startswith("file://"):
        return uri[len("file://"):]
    if uri.startswith("file:"):
        return uri[len("file:"):]
    if "://" in uri:
        return None
    return uri


_MEMORY_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_memory(text: str | int) -> int:
    """'4g', '512m', '1.5G', 1000000 -> bytes (the units Spark and autofaiss accept)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([bkmgt]?)i?b?\s*", str(text).lower())
    if not match:
        raise ValueError(f"cannot read a memory size from {text!r} (examples: 512m, 4g)")
    return int(float(match.group(1)) * _MEMORY_UNITS[match.group(2)])


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    # YAML parsing gives numbers, booleans and lists for free (--set evaluate.backbones=[a,b]).
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: cannot parse value {text!r}: {exc}") from exc
    return key, value


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"cannot set {key!r}: {part!r} is not a section")
        node = nxt
    node[parts[-1]] = value


def _build(cls: type, raw: Mapping[str, Any], prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'; known keys under "
            f"{prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(fields))}"
        )
    kwargs: dict[str, Any] = {}
    hints = _resolved_types(cls)
    for name, value in raw.items():
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            kwargs[name] = _build(typ, value, prefix + name + ".")
        else:
            kwargs[name] = _coerce(prefix + name, typ, value)
    return cls(**kwargs)


def _resolved_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(key: str, typ: Any, value: Any) -> Any:
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{key} must not be empty")
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, inner[0], value)
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(key, args[0], v) for v in value]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return copy.deepcopy(dict(value))
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return int(value)
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if typ is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return str(value)
    return value
