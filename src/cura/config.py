"""Typed configuration: dataclasses are the one home of every default.

This module turns plain data (a YAML file, `key=value` overrides, CLI flags) into nested dataclasses and
back, checking every key and value against the dataclass's type hints. Errors name the key the way the user
wrote it (`lora.r`, `data.max_length`) and say how to fix it; the CLI flags are generated from the same
fields, so no default is restated anywhere else.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import io
import textwrap
import tokenize
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
        return _coerce_union(value, tp, key)
    if origin is Literal:
        allowed = get_args(tp)
        if value in allowed:
            return value
        raise CuraError(f"config key '{key}' must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    if tp in _SCALARS:
        return _SCALARS[tp](value, key)
    if origin in (list, tuple):
        return _coerce_sequence(value, tp, key)
    if origin is dict:
        return _coerce_mapping(value, tp, key)
    if is_config(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise CuraError(f"config section '{key}' must be a mapping of keys, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    return value


def _coerce_union(value: Any, tp: Any, key: str) -> Any:
    args = get_args(tp)
    if _NONE in args and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
        return None
    for arg in args:
        if arg is _NONE:
            continue
        try:
            return coerce(value, arg, key)
        except CuraError:
            continue
    raise CuraError(f"config key '{key}' must be {describe_type(tp)}, got {value!r}")


def _coerce_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
        return True
    if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
        return False
    raise CuraError(f"config key '{key}' must be true or false, got {value!r}")


def _coerce_int(value: Any, key: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.replace("_", ""))
        except ValueError:
            pass
    raise CuraError(f"config key '{key}' must be an integer, got {value!r}")


def _coerce_float(value: Any, key: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise CuraError(f"config key '{key}' must be a number, got {value!r}")


def _coerce_str(value: Any, key: str) -> str:
    if isinstance(value, (str, Path)):
        return str(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise CuraError(f"config key '{key}' must be a string, got {value!r}")


_SCALARS = {bool: _coerce_bool, int: _coerce_int, float: _coerce_float, str: _coerce_str}


def _coerce_sequence(value: Any, tp: Any, key: str) -> list | tuple:
    (item_tp, *_rest) = get_args(tp) or (Any,)
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)):
        raise CuraError(f"config key '{key}' must be a list, got {value!r}")
    items = [coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if get_origin(tp) is tuple else items


def _coerce_mapping(value: Any, tp: Any, key: str) -> dict:
    key_tp, val_tp = get_args(tp) or (Any, Any)
    if isinstance(value, str):  # "a=b,c=d"
        pairs = [p for p in value.split(",") if p.strip()]
        try:
            value = dict(p.split("=", 1) for p in pairs)
        except ValueError:
            raise CuraError(f"config key '{key}' must be a mapping like 'a=b,c=d', got {value!r}") from None
    if not isinstance(value, dict):
        raise CuraError(f"config key '{key}' must be a mapping, got {value!r}")
    return {coerce(k, key_tp, key): coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}


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


def field_help(tp: Any, f: dataclasses.Field, doc: str | None = None) -> str:
    """A flag's help line from its field: what it means (`doc`, see `field_docs`), then the accepted values
    and the default (from the dataclass)."""
    if f.default is not dataclasses.MISSING:
        default = f.default
    elif f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    else:
        return f"{doc} ({describe_type(tp)})" if doc else describe_type(tp)
    if isinstance(default, tuple):
        default = ",".join(map(str, default)) or "none"
    values = f"{describe_type(tp)}; default {default}"
    return f"{doc} ({values})" if doc else values


@functools.cache
def field_docs(cls) -> dict[str, str]:
    """Each field's documentation as written in the dataclass's source: a string right after the field (an
    attribute docstring), else the comment at the end of its line, else the comment lines just above it."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (a frozen or interactive class): no docs, not an error
        return {}
    trailing, above = {}, {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            (above if tok.line.lstrip().startswith("#") else trailing)[tok.start[0]] = text
    body = ast.parse(source).body[0].body
    docs = {}
    for i, node in enumerate(body):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        after = body[i + 1] if i + 1 < len(body) else None
        if isinstance(after, ast.Expr) and isinstance(getattr(after, "value", None), ast.Constant):
            if isinstance(after.value.value, str):
                docs[node.target.id] = " ".join(after.value.value.split())
                continue
        if node.end_lineno in trailing:
            docs[node.target.id] = trailing[node.end_lineno]
            continue
        lines, line = [], node.lineno - 1
        while line in above:
            lines.insert(0, above[line])
            line -= 1
        if lines:
            docs[node.target.id] = " ".join(lines)
    return docs


def leaf_docs(cls, prefix: str = "") -> dict[str, str]:
    """`field_docs` of a nested config class, by dotted key."""
    out = {prefix + name: doc for name, doc in field_docs(cls).items()}
    hints = _hints(cls)
    for name in _fields(cls):
        if is_config(hints[name]):
            out.update(leaf_docs(hints[name], f"{prefix}{name}."))
    return out


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
    """A YAML config file as a mapping. Safe loading only (no Python tags); every way the file can be wrong
    (missing, not UTF-8, too large, bad syntax, nested too deep, a number too long) is one sentence naming
    file:line (see `cura.inputs`)."""
    import yaml

    from cura.inputs import MAX_CONFIG_BYTES, check_depth, read_text

    path = Path(path)
    if not path.is_file():
        raise CuraError(f"config file {path} does not exist; pass the path of a YAML file")
    text = read_text(path, what="config file", max_bytes=MAX_CONFIG_BYTES)
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise CuraError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)}); fix the syntax") from None
    except RecursionError:
        raise CuraError(f"{path}: nested too deeply to be a config; flatten it") from None
    except ValueError as exc:  # e.g. an integer of more than 4,300 digits
        reason = "a number has more than 4,300 digits" if "digits" in str(exc) else str(exc)
        raise CuraError(f"{path}: a value cannot be read ({reason}); fix it") from None
    if not isinstance(data, dict):
        raise CuraError(f"{path}: a config file must be a mapping of keys to values")
    return check_depth(data, str(path))
