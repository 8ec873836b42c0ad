"""Settings a registry entry owns: `method.NAME.KEY` in the config, an `Options` dataclass on the entry.

An entry that has settings declares `Options` (a dataclass: each field's default, with its unit in a
comment) and `RULES` ((setting, test, what it must be)); one without sets `Options = None`. The config keeps
the named entry's settings as an instance of its Options and writes them back under SECTION.NAME; this
module reads them out of the config's mapping, fills in the defaults and checks the rules, so config.py
knows no entry's settings and an entry from a plugin is configured like a built-in one.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, get_type_hints

from simclr_cli.errors import ConfigError
from simclr_cli.registry import BUILT_IN, Registry
from simclr_cli.typed import build


def _declared(entry: Any) -> set[str]:
    options = getattr(entry, "Options", None)
    return {f.name for f in dataclasses.fields(options)} if options else set()


def _built_in_settings(registry: Registry) -> set[str]:
    """Every setting a built-in entry declares (the names the flat layout of older files may hold)."""
    return {key for e in registry.entries() if e.origin == BUILT_IN for key in _declared(registry[e.name])}


def settings(registry: Registry, section: str, raw: dict, name: str) -> dict:
    """The settings of entry `name` from a config section's mapping: SECTION.NAME.KEY. Flat keys
    (`method.queue_size`: the layout before entries owned their settings, which older configs and
    checkpoints carry) count as the named entry's where it declares them, and are left out where only another
    built-in entry does, as they were then; another entry's SECTION.OTHER mapping is left out."""
    own = raw.get(name) or {}
    if not isinstance(own, dict):
        raise ConfigError(f"'{section}.{name}' must be a mapping of its settings to values")
    own, declared = dict(own), _declared(registry[name])
    for key, value in raw.items():
        if key == "name" or key in registry:
            continue
        if key in declared:
            own.setdefault(key, value)
        elif key not in _built_in_settings(registry):
            known = ["name", *registry.names()]
            hint = difflib.get_close_matches(str(key), known, n=1)
            fix = f"did you mean {hint[0]!r}?" if hint else f"valid keys: {', '.join(known)}"
            raise ConfigError(f"unknown config key '{section}.{key}': {fix} (a {registry.kind}'s own settings "
                              f"are {section}.NAME.KEY)")
    return own


def checked_options(registry: Registry, section: str, name: str, options: Any) -> tuple[Any, Any]:
    """(the entry `name`, its settings as an instance of its Options with the defaults filled in, checked
    against its RULES). `options` may be that instance, a mapping or None; one line names SECTION.NAME.KEY."""
    entry, where = registry[name], f"{section}.{name}."
    declared = getattr(entry, "Options", None)
    if declared is None:
        if options not in (None, {}):
            raise ConfigError(f"'{section}.{name}' takes no settings; got {options!r}")
        return entry, None
    if not isinstance(options, declared):
        fields = dataclasses.asdict(options) if dataclasses.is_dataclass(options) else options
        options = build(declared, fields, where)
    for key, test, what in getattr(entry, "RULES", ()):
        if not test(getattr(options, key)):
            raise ConfigError(f"'{where}{key}' must be {what}; got {getattr(options, key)!r}")
    return entry, options


def option_hint(registry: Registry, name: str, key: str) -> Any:
    """The type of setting `key` of entry `name`, or None where there is none (validation names it later)."""
    if name not in registry:
        return None
    declared = getattr(registry[name], "Options", None)
    return get_type_hints(declared).get(key) if declared else None
