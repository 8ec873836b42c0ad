"""Nested dataclasses from plain data (what YAML gives), with every value checked against its field's type.

Unknown keys are refused with a close-match hint; ints are accepted where floats are expected, and so is
exponent notation without a dot such as 5e-4, which YAML 1.1 reads as a string; values YAML read as
something other than text (a date, !!binary, !!set) are named as such. Knows nothing of the project's
config: `config.py` holds the dataclasses and the rules.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import math
import re
import types
from typing import Any, Union, get_args, get_origin, get_type_hints

from simclr_cli.errors import ConfigError


def _unknown_key(key: str, known: list[str], where: str) -> ConfigError:
    hint = difflib.get_close_matches(key, known, n=1)
    fix = f"did you mean '{hint[0]}'?" if hint else f"valid keys: {', '.join(known)}"
    return ConfigError(f"unknown config key '{where}{key}': {fix}")


def _shown(value: Any) -> str:
    """A YAML value as the user wrote it, with a hint when YAML read it as something else than text."""
    if isinstance(value, (datetime.date, datetime.datetime)):
        return f"{value.isoformat()}, which YAML reads as a date (quote it to mean text: '{value.isoformat()}')"
    if isinstance(value, bytes):
        return f"{len(value)} bytes of !!binary data"
    if isinstance(value, (set, frozenset)):
        return f"a !!set {sorted(map(str, value))}"
    if isinstance(value, dict):
        return "a mapping"
    return repr(value)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check one YAML value against its field's type; ints are accepted where floats are expected, and so is
    exponent notation without a dot such as 5e-4, which YAML 1.1 reads as a string."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin = get_origin(hint)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"'{key}' must be a list, got {_shown(value)}")
        return [_coerce(v, get_args(hint)[0], key) for v in value]
    if origin is dict:  # keywords handed on as they are (a model's constructor checks them)
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"'{key}' must be a mapping of names to values, got {_shown(value)}")
        return dict(value)
    if hint is float and isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d+(\.\d*)?[eE][-+]?\d+\s*", value):
        value = float(value)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ConfigError(f"'{key}' must be a finite number, got {value!r}")
        return float(value)
    if hint is bool and isinstance(value, bool):
        return value
    if hint in (int, str) and isinstance(value, hint) and not isinstance(value, bool):
        return value
    raise ConfigError(f"'{key}' must be {getattr(hint, '__name__', hint)}, got {_shown(value)}")


def build(cls: type, raw: Any, where: str = "") -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"'{where.rstrip('.') or 'config'}' must be a mapping of keys to values")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            raise _unknown_key(str(key), names, where)
        if dataclasses.is_dataclass(hints[key]):
            kwargs[key] = build(hints[key], value, f"{where}{key}.")
        else:
            kwargs[key] = _coerce(value, hints[key], f"{where}{key}")
    return cls(**kwargs)
