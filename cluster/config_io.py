"""Configs as frozen dataclasses, read from YAML plus dotted command-line overrides.

    cfg = load_config(RunConfig, "experiments/configs/tiny.yaml", ["learner.lr=1e-5", "rl.epochs=3"])

Rules (the config is the single source of truth, so it must be hard to get wrong):
* unknown keys are errors that list the valid keys at that level;
* values are checked against the field's type (``int`` accepts ``3`` but not ``3.5`` or ``"3"``;
  ``float`` accepts ints; ``Optional[X]`` accepts null), errors name the full dotted key;
* an override's value is parsed as YAML (``lr=1e-5`` is a float, ``name=null`` is None).
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Optional, TypeVar

import yaml

T = TypeVar("T")
_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class ConfigError(ValueError):
    """A config value or key that cannot be used; the message names the dotted key."""


def from_dict(cls: type[T], data: Optional[dict], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) dict, rejecting unknown keys and wrong types."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = prefix.rstrip(".") or "top level"
        raise ConfigError(f"unknown key(s) {', '.join(prefix + k for k in unknown)} at {where}; "
                          f"valid keys: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        default = _default(fields[name])
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            # A section given in part keeps the parent's defaults for the rest of it.
            value = merge(to_dict(default), value)
        kwargs[name] = _convert(hints[name], value, prefix + name)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from None


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


@dataclasses.dataclass(frozen=True)
class _Override:
    """A command-line value: parsed as YAML (``rl.epochs=3`` is an int), its text kept for string
    keys, where YAML's reading would be a surprise (``name=off`` is "off", not False)."""
    text: str
    value: Any


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if isinstance(value, _Override):
        takes_text = tp is str or (origin in (typing.Union, types.UnionType) and str in typing.get_args(tp))
        scalar = value.value is not None and not isinstance(value.value, (dict, list))
        value = value.text if takes_text and scalar else value.value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {args}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key + ".")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        item_type = args[0] if args else Any
        items = [_convert(item_type, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: must be one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
        return float(value)   # YAML 1.1 (PyYAML) reads 3e-4, without a dot, as a string
    if tp is Path and isinstance(value, str):
        return Path(value)
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r} ({type(value).__name__})")
    return value


def parse_overrides(overrides: Iterable[str]) -> dict:
    """``["learner.lr=1e-5", "run.name=x"]`` → ``{"learner": {"lr": 1e-5}, "run": {"name": "x"}}``."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        value = _Override(raw, yaml.safe_load(raw) if raw.strip() else "")
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is set to a value and also has sub-keys")
        node[parts[-1]] = value
    return tree


def merge(base: dict, update: dict) -> dict:
    """Recursive dict merge; ``update`` wins."""
    out = dict(base)
    for key, value in update.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(cls: type[T], path: Optional[Path | str] = None, overrides: Iterable[str] = ()) -> T:
    data: dict = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: bad YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    try:
        return from_dict(cls, merge(data, parse_overrides(overrides)))
    except ConfigError as e:
        raise ConfigError(f"{path or 'config'}: {e}") from None


def to_dict(cfg: Any) -> dict:
    """Plain dict (tuples as lists, paths as strings) that `from_dict` turns back into ``cfg``."""
    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return str(v) if isinstance(v, Path) else v
    return plain(dataclasses.asdict(cfg))


def dump_yaml(cfg: Any, path: Path | str) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
