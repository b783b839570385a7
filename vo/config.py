"""Options from the command line: ``KEY=VALUE`` pairs applied to config dataclasses."""
from __future__ import annotations

import json
from dataclasses import fields, is_dataclass, replace


def parse_overrides(pairs: list[str]) -> dict:
    """``key=value`` pairs; values are read as JSON when they parse, else kept as strings."""
    conf = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            conf[key] = json.loads(value)
        except json.JSONDecodeError:
            conf[key] = value
    return conf


def with_overrides(config, overrides: dict):
    """A copy of a config dataclass with ``{"field": value}`` applied; "ba.window" reaches a nested
    one. An unknown field raises ValueError naming it: a mistyped option must not be ignored."""
    for key, value in overrides.items():
        config = _replace_path(config, key.split("."), value, key)
    return config


def _replace_path(config, path: list[str], value, key: str):
    head, rest = path[0], path[1:]
    if not is_dataclass(config) or head not in {f.name for f in fields(config)}:
        raise ValueError(f"unknown option {key!r}")
    current = getattr(config, head)
    if not rest:
        check_type(key, current, value)
    return replace(config, **{head: _replace_path(current, rest, value, key) if rest else value})


def check_type(key: str, current, value) -> None:
    """A value must be of the option's kind: a whole number for a count, any number for a float,
    true/false for a flag."""
    if is_dataclass(current):
        raise ValueError(f"option {key!r} is a group: set its fields as {key}.FIELD=VALUE")
    if isinstance(current, bool) or isinstance(value, bool):
        ok = isinstance(current, bool) == isinstance(value, bool)
    elif isinstance(current, int):
        ok = isinstance(value, int)
    elif isinstance(current, float):
        ok = isinstance(value, (int, float))
    else:
        ok = current is None or isinstance(value, type(current))
    if not ok:
        raise ValueError(f"option {key!r} takes a value like {json.dumps(current)}, got {json.dumps(value)}")
