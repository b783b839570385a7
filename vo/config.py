"""Options from the command line: ``KEY=VALUE`` pairs applied to config dataclasses."""
from __future__ import annotations

import json
import typing
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
        check_type(key, current, value, typing.get_type_hints(type(config))[head])
    return replace(config, **{head: _replace_path(current, rest, value, key) if rest else value})


def fits(value, kind: type) -> bool:
    """``value`` is of the option kind ``kind``: a whole number for a count, any number for a float,
    true/false for a flag."""
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


def check_type(key: str, current, value, hint=None) -> None:
    """A value must be of the option's kind; an option that is None by default takes null or a
    value of its declared type (``float | None``: a number)."""
    if is_dataclass(current):
        raise ValueError(f"option {key!r} is a group: set its fields as {key}.FIELD=VALUE")
    declared = typing.get_args(hint) or (hint,)
    if value is None and (current is None or type(None) in declared):
        return
    kinds = [type(current)] if current is not None else \
        [kind for kind in declared if isinstance(kind, type) and kind is not type(None)]
    if kinds and not any(fits(value, kind) for kind in kinds):
        shown = current if current is not None else kinds[0]()
        raise ValueError(f"option {key!r} takes a value like {json.dumps(shown)}, got {json.dumps(value)}")
