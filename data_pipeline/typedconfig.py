"""Typed configs: dataclasses loaded from YAML with dotted ``key=value`` overrides.

Every component of timemae-dist has a small dataclass config. Each field carries a one-line
help text (``field(metadata={"help": ...})``, written with :func:`option`). This module turns
YAML (plus CLI overrides) into those dataclasses and rejects anything it does not understand:
unknown keys and wrong types raise :class:`ConfigError` naming the dotted key and the fix.

The module is deliberately dependency-free (PyYAML only) and lives in ``data_pipeline``, the
lowest layer, so that ``timemae_dist`` and ``launch`` can build on it without import cycles.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")
_EXP_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")

__all__ = [
    "ConfigError",
    "option",
    "load_config",
    "from_dict",
    "to_dict",
    "apply_overrides",
    "config_fields",
    "render_config",
]


class ConfigError(ValueError):
    """A config value a user wrote is wrong. The message names the dotted key and the fix."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.detail = message
        super().__init__(f"config key '{key}': {message}" if key else message)

    def prefixed(self, prefix: str) -> "ConfigError":
        key = f"{prefix}.{self.key}" if self.key else prefix
        return ConfigError(key, self.detail)


def option(default: Any = dataclasses.MISSING, help: str = "", **kwargs: Any) -> Any:
    """A dataclass field with a one-line ``help``; mutable defaults are copied per instance."""
    metadata = {"help": help}
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(
            default_factory=lambda: type(value)(value), metadata=metadata, **kwargs
        )
    if dataclasses.is_dataclass(default) and not isinstance(default, type):
        value = default
        return dataclasses.field(
            default_factory=lambda: dataclasses.replace(value), metadata=metadata, **kwargs
        )
    if isinstance(default, type) and dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=default, metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def config_fields(cls: type) -> list[tuple[str, Any, Any, str]]:
    """``(name, type, default, help)`` for each field of a config dataclass (for docs/--help)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = dataclasses.MISSING
        out.append((f.name, hints[f.name], default, f.metadata.get("help", "")))
    return out


# --------------------------------------------------------------------------------------------
# dict <-> dataclass


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        k, v = typing.get_args(tp)
        return f"mapping {_type_name(k)} -> {_type_name(v)}"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, key: str) -> Any:
    """Check/convert one YAML value against a type annotation; raise ConfigError on mismatch."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        return from_dict(tp, value, _prefix=key)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(key, f"must not be null (expected {_type_name(tp)})")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, key)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if isinstance(value, bool) and ("on" if value else "off") in allowed:
            return "on" if value else "off"  # YAML 1.1 reads a bare on/off as a boolean
        if value not in allowed:
            raise ConfigError(
                key, f"got {value!r}; choose one of {', '.join(repr(a) for a in allowed)}"
            )
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {value!r}")
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        items = [_convert(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        ktp, vtp = typing.get_args(tp)
        out = {}
        for k, v in value.items():
            if ktp is int and isinstance(k, str) and k.lstrip("-").isdigit():
                k = int(k)  # keys from dotted overrides and JSON are strings
            out[_convert(ktp, k, f"{key}.{k}")] = _convert(vtp, v, f"{key}.{k}")
        return out
    if value is None:
        raise ConfigError(key, f"must not be null (expected {_type_name(tp)})")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(key, f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _EXP_FLOAT.fullmatch(value.strip()):
            return float(value)  # `1e-4`: YAML 1.1 (PyYAML) reads exponents without a dot as text
        raise ConfigError(key, f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(key, f"expected a string, got {value!r} (quote it in YAML)")
    raise TypeError(f"config type {tp!r} for '{key}' is not supported")  # programming error


def from_dict(cls: type[T], data: dict, _prefix: str = "") -> T:
    """Build config dataclass ``cls`` from a plain mapping, validating keys, types and values."""
    if not isinstance(data, dict):
        raise ConfigError(_prefix, f"expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for k, v in data.items():
        full = f"{_prefix}.{k}" if _prefix else str(k)
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(names)}"
            raise ConfigError(full, f"unknown key; {hint}")
        kwargs[k] = _convert(hints[k], v, full)
    for f in dataclasses.fields(cls):
        if (
            f.init
            and f.name not in kwargs
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
        ):
            full = f"{_prefix}.{f.name}" if _prefix else f.name
            raise ConfigError(full, "is required; set it in the YAML file or as an override")
    try:
        obj = cls(**kwargs)
        validate = getattr(obj, "validate", None)
        if validate is not None:
            validate()
    except ConfigError as e:
        raise (e.prefixed(_prefix) if _prefix else e) from None
    return obj


def to_dict(cfg: Any) -> Any:
    """A config dataclass as plain YAML/JSON-able data (inverse of :func:`from_dict`)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def render_config(cfg: Any, _indent: int = 0) -> str:
    """A config dataclass as commented YAML: every key with its value, and a comment with its
    type and help text. The output loads back to the same config (``yaml.safe_load`` +
    :func:`from_dict`); ``--print-config`` of the CLI prints it."""
    pad = "  " * _indent
    lines = []
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        help_ = f.metadata.get("help", "")
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            lines.append(f"{pad}{f.name}:" + (f"  # {help_}" if help_ else ""))
            lines.append(render_config(value, _indent + 1))
            continue
        # a bare scalar is dumped as a document: "value\n...\n"
        dumped = yaml.safe_dump(to_dict(value), default_flow_style=True, width=10_000, sort_keys=False)
        dumped = dumped.strip().removesuffix("\n...").strip()
        comment = f"({_type_name(hints[f.name])})" + (f" {help_}" if help_ else "")
        lines.append(f"{pad}{f.name}: {dumped}  # {comment}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# YAML + overrides


def _field_type(cls: Any, parts: list[str]) -> Any:
    """The annotation at a dotted path of config dataclass ``cls`` (None if there is none)."""
    tp = cls
    for part in parts:
        if typing.get_origin(tp) in (Union, types.UnionType):  # Optional[SomeConfig]
            inner = [a for a in typing.get_args(tp) if a is not type(None)]
            tp = inner[0] if len(inner) == 1 else None
        if not (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
            return None
        hints = typing.get_type_hints(tp)
        if part not in hints:
            return None
        tp = hints[part]
    return tp


def _text_valued(tp: Any) -> tuple[bool, bool]:
    """(the type takes text only: str / Literal of strings, optionally null; null allowed)."""
    if tp is None:
        return False, False
    args = [tp]
    nullable = False
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        nullable = len(args) < len(typing.get_args(tp))
    if len(args) != 1:
        return False, nullable
    a = args[0]
    if a is str:
        return True, nullable
    if typing.get_origin(a) is Literal and all(isinstance(v, str) for v in typing.get_args(a)):
        return True, nullable
    return False, nullable


def apply_overrides(data: dict, overrides: typing.Iterable[str], cls: Any = None) -> dict:
    """Apply dotted ``a.b.c=value`` overrides (values parsed as YAML) to a nested mapping.

    With the config class ``cls``, a key whose type takes only text (``str``, a ``Literal`` of
    strings) gets the text as written, so ``run.name=off`` or ``run.name=2026-12-03`` stay
    strings instead of YAML's boolean / date (quote it, ``key='x'``, to force YAML; ``null``
    still means null where the type allows it)."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "an override must look like key=value (e.g. window.length=128)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(key, "an override key must be dotted names like output.path")
        parts = key.split(".")
        text_only, nullable = _text_valued(_field_type(cls, parts)) if cls is not None else (False, False)
        text = raw.strip()
        if text_only and not text.startswith(("'", '"')) and not (nullable and text in ("null", "~", "")):
            value = text
        else:
            try:
                value = yaml.safe_load(raw) if text != "" else ""
            except yaml.YAMLError as e:
                raise ConfigError(key, f"value {raw!r} is not valid YAML ({e.__class__.__name__})") from None
        node = data
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(".".join(parts[: depth + 1]), "is not a mapping; cannot set a sub-key")
            else:
                child = dict(child)
            node[part] = child
            node = child
        node[parts[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping, with a clear error for a missing/invalid file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("", f"config file {str(p)!r} does not exist; pass the path of a YAML file")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError("", f"config file {str(p)!r} is not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("", f"config file {str(p)!r} must hold a mapping at the top level")
    return data


def load_config(
    cls: type[T], path: str | Path | None = None, overrides: typing.Iterable[str] = ()
) -> T:
    """YAML file (optional) + dotted overrides -> validated config dataclass ``cls``."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides, cls)
    return from_dict(cls, data)
