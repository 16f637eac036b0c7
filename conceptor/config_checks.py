"""Checks every config value gets whatever method it belongs to: the type its field declares, and a finite
number where a float is wanted. Field metadata (config.opt) names the flag a message should mention."""
from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

from .errors import ConceptorError

# What a config value must be, in the file's own words. An int field takes no bool (YAML's yes/no) and no
# 3.0: a step count written as a float is more likely a typo than a wish; a float field takes ints.
_KINDS = {bool: ("true or false", lambda v: isinstance(v, bool)),
          int: ("a whole number", lambda v: isinstance(v, int) and not isinstance(v, bool)),
          float: ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
          str: ("a string", lambda v: isinstance(v, str))}
_PLURAL = {bool: "true/false values", int: "whole numbers", float: "numbers", str: "strings"}


def _kind_problem(hint: Any, value: Any) -> str | None:
    """What ``value`` should be when it does not fit the annotation ``hint``; None when it fits."""
    args = typing.get_args(hint)
    if type(None) in args:  # X | None
        if value is None:
            return None
        problem = _kind_problem(next(a for a in args if a is not type(None)), value)
        return problem and f"{problem} or null"
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        ok = isinstance(value, list) and all(_kind_problem(item, v) is None for v in value)
        return None if ok else f"a list of {_PLURAL[item]}"
    if hint not in _KINDS:  # a field type this table does not know yet: its own checks apply
        return None
    word, fits = _KINDS[hint]
    return None if fits(value) else word


def _shown(value: Any) -> str:
    """A file value as the user wrote it, one short line."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_types(section: str, cls: type, values: dict[str, Any]) -> None:
    """Every known key of a config-file section against its dataclass annotation (unknown keys are caught later)."""
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        problem = _kind_problem(hints[key], value) if key in hints else None
        if problem:
            raise ConceptorError(f"config file: {section}.{key} must be {problem}, got {_shown(value)}")


def option_name(section: str, f: dataclasses.Field) -> str:
    """How the user gave a setting: its flag, or section.key for settings only a config file holds."""
    if f.metadata.get("cli", True) is False:
        return f"{section}.{f.name}"
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def check_finite(sections: dict[str, Any]) -> None:
    """NaN/inf in any float setting (a config file's .nan, a flag's 'inf') passes every < and > test silently."""
    for section, values in sections.items():
        hints = typing.get_type_hints(type(values))
        for f in dataclasses.fields(values):
            value, hint = getattr(values, f.name), hints[f.name]
            if float in (hint, *typing.get_args(hint)) and value is not None and not math.isfinite(value):
                raise ConceptorError(f"{option_name(section, f)} must be a finite number, got {value}")
