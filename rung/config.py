"""Typed configs from YAML and `--set a.b=value` overrides, and the one way to change them.

Every component config is a plain (frozen) dataclass; this module is the one place that turns untyped data (YAML,
command lines, Ray Serve args) into those dataclasses, so every field is checked against its annotation and by its
`__post_init__`, and an error always names the field. A config is changed with `evolve`, which builds it again
through `from_dict`, so every sub-config's checks run on the new values as well.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from rung.errors import ConfigError

T = TypeVar("T")


def from_dict(cls: type[T], data: Any, path: str = "") -> T:
    """Build dataclass `cls` from a mapping, checking every value's type and rejecting unknown keys."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(path, f"expected a mapping for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - known)
    if unknown:
        where = _join(path, str(unknown[0]))
        raise ConfigError(where, f"unknown field (known: {', '.join(sorted(known))})")
    kwargs = {name: _convert(hints[name], value, _join(path, name)) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise err.under(path) if path else err


def to_dict(config: Any) -> dict[str, Any]:
    """Plain data (tuples as lists) for YAML/JSON records of a config."""
    return _plain(dataclasses.asdict(config))


def evolve(config: T, changes: dict[str, Any]) -> T:
    """A copy of `config` with dotted fields changed (`{"train.lr": 1e-3, "model.d_model": 128}`), validated as a
    whole: every `__post_init__` of every sub-config runs again. An unknown field is a ConfigError naming it."""
    data = to_dict(config)
    for key, value in changes.items():
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
            if not isinstance(node, dict):
                raise ConfigError(key, "no such config section")
        if leaf not in node:
            raise ConfigError(key, "no such config field")
        node[leaf] = to_dict(value) if dataclasses.is_dataclass(value) else value
    return from_dict(type(config), data)


def default(cls: type, name: str) -> Any:
    """The default of field `name` of dataclass `cls` (what a CLI flag defaults to, so the two never differ)."""
    spec = next((f for f in dataclasses.fields(cls) if f.name == name), None)
    if spec is None:
        raise KeyError(f"{cls.__name__} has no field {name!r}")
    if spec.default is not dataclasses.MISSING:
        return spec.default
    if spec.default_factory is not dataclasses.MISSING:
        return spec.default_factory()
    raise KeyError(f"{cls.__name__}.{name} has no default")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing or malformed file is a config error that names the path."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("", f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError("", f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError("", f"{path} must hold a mapping at the top level")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=value` overrides (values parsed as YAML scalars or lists) to nested config data."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError("", f"--set expects key=value, got {item!r}")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(key, f"{part} is not a section")
            node = child
        node[leaf] = yaml.safe_load(raw) if raw else ""
    return data


def _convert(hint: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own error, with its field path, is the useful one
            return _convert(options[0], value, path)
        errors = []
        for option in options:
            try:
                return _convert(option, value, path)
            except ConfigError as err:
                errors.append(err.message)
        raise ConfigError(path, "; ".join(errors))
    if origin is Literal:
        if value not in args:
            raise ConfigError(path, f"must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, f"expected a list, got {value!r}")
        item_hints = args if origin is tuple and Ellipsis not in args else (args[0],) * len(value)
        if len(item_hints) != len(value):
            raise ConfigError(path, f"expected {len(item_hints)} items, got {len(value)}")
        items = [_convert(h, v, f"{path}[{i}]") for i, (h, v) in enumerate(zip(item_hints, value))]
        return tuple(items) if origin is tuple else items
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, path)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"expected an integer, got {value!r}")
        return value
    if hint is float:
        # YAML 1.1 reads "1e-3" (no dot) as a string; accept it as the number every user means.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, f"expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"expected a string, got {value!r}")
        return value
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name
