"""Frozen dataclass configs with strict keys and types.

A config is a tree of frozen dataclasses whose defaults live next to the code that owns
them. A preset TOML file holds only differences from those defaults; command-line
overrides are ``section.key=value`` with the value parsed as a TOML literal (a bare word
is a string). Unknown keys and wrong types raise ``ConfigError`` naming the dotted key.
A field whose key is a Python keyword names it in its metadata:
``from_: str = field(default="", metadata={"key": "from"})`` is the key ``from``.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

T = TypeVar("T")

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"


class ConfigError(ValueError):
    """A config key is unknown, has the wrong type, or an override is malformed."""


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against the type hint ``hint``; return it in canonical form."""
    origin = get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        return from_dict(hint, value, prefix=f"{key}.")
    if origin is Literal:
        if value not in get_args(hint):
            raise ConfigError(f"{key}: {value!r} is not one of {list(get_args(hint))}")
        return value
    if origin in (Union, types.UnionType):
        args = get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[-1] if errors else f"{key}: bad value {value!r}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if hint is Any:
        return value
    raise ConfigError(f"{key}: unsupported config type {hint!r}")


def _key(f: dataclasses.Field) -> str:
    """The config key of a dataclass field (its name, unless the metadata says otherwise)."""
    return f.metadata.get("key", f.name)


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build the dataclass ``cls`` from a nested mapping; missing keys keep defaults."""
    hints = get_type_hints(cls)
    names = {_key(f): f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}' (known under "
            f"'{prefix or '<root>'}': {', '.join(sorted(names))})"
        )
    kwargs = {names[k]: _coerce(v, hints[names[k]], f"{prefix}{k}") for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dict (tuples become lists) suitable for JSON and TOML."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {_key(f): plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        return value

    return plain(cfg)


def merge(base: Mapping[str, Any], diff: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge ``diff`` into a copy of ``base`` (tables merge, everything else replaces)."""
    out = dict(base)
    for key, value in diff.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.max_steps=200"`` -> (["train", "max_steps"], 200)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word is a string: data.path=data/emoji-32
    return parts, value


def _set_dotted(data: dict[str, Any], parts: Sequence[str], value: Any) -> dict[str, Any]:
    diff: dict[str, Any] = value
    for part in reversed(parts):
        diff = {part: diff}
    for i in range(1, len(parts)):
        node = data
        for part in parts[:i]:
            node = node.get(part, {}) if isinstance(node, Mapping) else None
        if node is not None and not isinstance(node, Mapping):
            raise ConfigError(f"'{'.'.join(parts[:i])}' is a value, not a section")
    return merge(data, diff)


def load_config(
    cls: type[T],
    preset: str | None = None,
    stage: str | None = None,
    overrides: Sequence[str] = (),
    configs_dir: Path = CONFIGS_DIR,
) -> T:
    """Defaults <- ``configs/<preset>/<stage>.toml`` <- ``overrides``, strictly checked."""
    data = to_dict(cls())
    if preset is not None and stage is not None:
        preset_dir = configs_dir / preset
        if not preset_dir.is_dir():
            known = sorted(p.name for p in configs_dir.iterdir() if p.is_dir())
            raise ConfigError(f"unknown preset {preset!r} (known: {', '.join(known)})")
        path = preset_dir / f"{stage}.toml"
        if path.exists():
            try:
                diff = tomllib.loads(path.read_text())
            except tomllib.TOMLDecodeError as err:
                raise ConfigError(f"{path}: {err}") from err
            try:
                from_dict(cls, merge(data, diff))
            except ConfigError as err:
                raise ConfigError(f"{path}: {err}") from err
            data = merge(data, diff)
    for text in overrides:
        parts, value = parse_override(text)
        data = _set_dotted(data, parts, value)
    return from_dict(cls, data)


def changed_keys(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    keys = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            keys += changed_keys(va, vb, f"{prefix}{key}.")
        elif va != vb:
            keys.append(f"{prefix}{key}")
    return keys


def dumps(cfg: Any) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=False)


def save_json(cfg: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps(cfg) + "\n")


__all__ = [
    "CONFIGS_DIR",
    "ConfigError",
    "changed_keys",
    "dumps",
    "from_dict",
    "load_config",
    "merge",
    "parse_override",
    "save_json",
    "to_dict",
]
