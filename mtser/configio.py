"""The one validating YAML loader: YAML text → typed dataclasses, every problem a ConfigError naming the key.

`load_yaml_as(path, cls)` reads a YAML file into dataclass `cls`; `from_dict(cls, data)` builds it from plain data,
rejecting unknown keys and wrong types with the key's dotted name (`model.pooling: expected one of ['asp', 'mean'],
got 'max'`); `to_dict` turns it back into plain data. The schemas live with their layers
(`mtser.featurestore.config`, `mtser.trainer.config`, `mtser.trainer.search_config`); each dataclass checks its own
values in `__post_init__` and raises `ConfigError(reason, key)` with the key relative to itself, which `from_dict`
prefixes with the path it was reached by.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from mtser.errors import UsageError

T = TypeVar("T")


class ConfigError(UsageError, ValueError):
    """A config file or override is invalid; the message names the offending key.

    Raised as `ConfigError(reason, key)` by a dataclass's own checks: the message is `key: reason`, and `from_dict`
    prefixes `key` with the path the dataclass was reached by (`train` + `batch_size` → `train.batch_size`)."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(f"{key}: {message}" if key else message)
        self.key, self.reason = key, message


MAX_CONFIG_BYTES = 1 << 20        # a recipe is a few KB; anything near this is not a config
MAX_CONFIG_VALUES = 100_000       # values after YAML aliases are expanded (an "alias bomb" expands to billions)
MAX_SHOWN = 80                    # characters of a value echoed into an error message


def load_yaml_as(path: str | Path, cls: type[T], overrides: dict[str, Any] | None = None) -> T:
    """Load and validate a YAML file as dataclass `cls`; every problem is a ConfigError naming the file."""
    path = Path(path)
    raw = parse_yaml(_read_text(path), str(path)) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    for dotted, value in (overrides or {}).items():
        apply_override(raw, dotted, value)
    try:
        return from_dict(cls, raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _read_text(path: Path) -> str:
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {size} bytes is too large for a config (at most {MAX_CONFIG_BYTES})")
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from exc
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (invalid byte at offset {exc.start})") from None


def parse_yaml(text: str, where: str) -> Any:
    """Safe-load YAML text (no Python objects), refusing documents whose aliases expand to more than
    MAX_CONFIG_VALUES values or that nest too deeply; errors name `where` and never echo a long value."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML: {_cut(' '.join(str(exc).split()), 300)}") from None
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply") from None
    _check_expanded_size(data, where)
    return data


def _check_expanded_size(data: Any, where: str) -> None:
    """Count values as if every alias were copied out (shared nodes count each time they are reached), stopping
    at MAX_CONFIG_VALUES: linear in the limit however large the expansion."""
    stack, count = [data], 0
    while stack:
        node = stack.pop()
        count += 1
        if count > MAX_CONFIG_VALUES:
            raise ConfigError(f"{where}: expands to more than {MAX_CONFIG_VALUES} values (YAML aliases?); "
                              "not a config")
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def shown(value: Any) -> str:
    """`value` as a message quotes it: its repr, cut to MAX_SHOWN characters."""
    return _cut(repr(value), MAX_SHOWN)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit - 15]}... ({len(text)} chars)"


def apply_override(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set the dotted key `dotted` (``"loss.alpha"``) of plain config data `raw` to `value`."""
    node = raw
    *parents, last = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {key} is not a section")
    _check_expanded_size(value, dotted)
    node[last] = value


def to_dict(obj: Any) -> Any:
    """A dataclass config as plain JSON/YAML-ready data (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """Build dataclass `cls` from plain data, rejecting unknown keys and wrong types with the key's dotted name."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{_join(where, unknown[0][:MAX_SHOWN])}: unknown key (allowed: {sorted(fields)})")
    kwargs = {}
    for name, f in fields.items():
        key = _join(where, name)
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{key}: required key is missing")
            continue
        kwargs[name] = _coerce(hints[name], data[name], key)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        if exc.key:
            raise ConfigError(exc.reason, _join(where, exc.key)) from None
        raise ConfigError(f"{where + ': ' if where else ''}{exc}") from None


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for option in args:
            try:
                return _coerce(option, value, key)
            except ConfigError as exc:
                if str(exc).startswith(f"{key}."):     # the value has this option's shape; a key inside it is wrong
                    raise
                errors.append(str(exc).split(": ", 1)[-1])
        raise ConfigError(f"{key}: {' or '.join(errors)}")
    if tp is type(None):
        if value is None or value == "none":
            return None
        raise ConfigError(f"{key}: expected null, got {shown(value)}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{key}: expected one of {list(args)}, got {shown(value)}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {shown(value)}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {shown(value)}")
        if args[0] is str and not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{key}: keys must be strings, got {shown(list(value))}")
        return {k: _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "2e-5" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {shown(value)}")
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value}")
        return number
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {shown(value)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {shown(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {shown(value)}")
    raise ConfigError(f"{key}: unsupported type {tp}")
