"""Typed configuration: dataclasses are the one home of every default.

This module turns plain data (a YAML file, `key=value` overrides, CLI flags) into nested dataclasses and
back, checking every key and value against the dataclass's type hints. Errors name the key the way the user
wrote it (`lora.r`, `data.max_length`) and say how to fix it; the CLI flags are generated from the same
fields, so no default is restated anywhere else.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from cura.errors import CuraError

_NONE = type(None)


def is_config(cls_or_obj: Any) -> bool:
    return dataclasses.is_dataclass(cls_or_obj)


def _hints(cls) -> dict[str, Any]:
    return get_type_hints(cls)


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def describe_type(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_type(a) for a in get_args(tp))
    if tp is _NONE:
        return "null"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert `value` (from YAML or a command-line string) to the annotated type `tp`, or raise CuraError."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and _NONE in args):
            if _NONE in args:
                return None
        errors = []
        for arg in args:
            if arg is _NONE:
                continue
            try:
                return coerce(value, arg, key)
            except CuraError as exc:
                errors.append(exc)
        raise CuraError(f"config key '{key}' must be {describe_type(tp)}, got {value!r}")
    if origin is Literal:
        allowed = get_args(tp)
        if value in allowed:
            return value
        raise CuraError(f"config key '{key}' must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        raise CuraError(f"config key '{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise CuraError(f"config key '{key}' must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise CuraError(f"config key '{key}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise CuraError(f"config key '{key}' must be a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise CuraError(f"config key '{key}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, Path)):
            return str(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise CuraError(f"config key '{key}' must be a string, got {value!r}")
    if origin in (list, tuple):
        (item_tp, *_rest) = get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise CuraError(f"config key '{key}' must be a list, got {value!r}")
        items = [coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        key_tp, val_tp = get_args(tp) or (Any, Any)
        if isinstance(value, str):  # "a=b,c=d"
            pairs = [p for p in value.split(",") if p.strip()]
            try:
                value = dict(p.split("=", 1) for p in pairs)
            except ValueError:
                raise CuraError(
                    f"config key '{key}' must be a mapping like 'a=b,c=d', got {value!r}"
                ) from None
        if not isinstance(value, dict):
            raise CuraError(f"config key '{key}' must be a mapping, got {value!r}")
        return {coerce(k, key_tp, key): coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if is_config(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise CuraError(f"config section '{key}' must be a mapping of keys, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    return value


def unknown_key_error(key: str, known: list[str]) -> CuraError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(sorted(known))}"
    return CuraError(f"unknown config key '{key}'{hint}")


def from_dict(cls, data: dict[str, Any], *, prefix: str = "", base=None):
    """Build `cls` from a (nested) mapping; keys not given keep the defaults (or `base`'s values)."""
    fields = _fields(cls)
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in fields:
            raise unknown_key_error(prefix + str(key), [prefix + k for k in fields])
        tp = hints[name]
        if is_config(tp) and isinstance(value, dict):
            current = getattr(base, name) if base is not None else None
            kwargs[name] = from_dict(tp, value, prefix=f"{prefix}{name}.", base=current)
        else:
            kwargs[name] = coerce(value, tp, prefix + name)
    try:
        if base is not None:
            return dataclasses.replace(base, **kwargs)
        return cls(**kwargs)
    except CuraError:
        raise
    except (TypeError, ValueError) as exc:
        raise CuraError(
            f"invalid configuration in section '{prefix.rstrip('.') or 'top level'}': {exc}"
        ) from None


def to_dict(obj) -> dict[str, Any]:
    """The config as plain data (for YAML/JSON), nested sections as mappings."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if is_config(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Put `value` at `a.b.c` in a nested mapping, creating sections on the way."""
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise CuraError(f"config key '{dotted}': '{part}' is not a section")
    node[leaf] = value


def field_help(tp: Any, f: dataclasses.Field) -> str:
    """A flag's help line from its field: the accepted values and the default (from the dataclass)."""
    if f.default is not dataclasses.MISSING:
        default = f.default
    elif f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    else:
        return describe_type(tp)
    if isinstance(default, tuple):
        default = ",".join(map(str, default)) or "none"
    return f"{describe_type(tp)}; default {default}"


def leaf_fields(cls, prefix: str = "") -> list[tuple[str, Any, dataclasses.Field]]:
    """Every leaf key of a nested config class as (dotted name, type, field)."""
    out = []
    hints = _hints(cls)
    for name, f in _fields(cls).items():
        tp = hints[name]
        if is_config(tp):
            out.extend(leaf_fields(tp, f"{prefix}{name}."))
        else:
            out.append((prefix + name, tp, f))
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise CuraError(f"config file {path} does not exist; pass the path of a YAML file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise CuraError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)}); fix the syntax") from None
    if not isinstance(data, dict):
        raise CuraError(f"{path}: a config file must be a mapping of keys to values")
    return data
