"""Sentences for pydantic's validation errors, shared by the settings file
(:mod:`chadthrottle.config`) and the rules (:mod:`chadthrottle.rules.model`): each names the
key itself; this says what was wrong and what was found instead, in words rather than
pydantic's type names."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_KINDS = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
          list: "a list", tuple: "a list", dict: "a table"}


def describe(value: Any) -> str:
    """What was found: "a boolean True", "a string 'x'" (long values cut at 60 characters)."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{_KINDS.get(type(value), type(value).__name__)} {text}"


def sentence(err: Mapping[str, Any], type_text: Mapping[str, str]) -> str:
    """One error's sentence: ``type_text[kind]`` and what was found for the kinds a module
    words itself, else pydantic's message without its "Value error, " prefix."""
    kind = err.get("type", "")
    if kind in type_text:
        return f"{type_text[kind]}, not {describe(err.get('input'))}"
    return str(err.get("msg", "invalid")).removeprefix("Value error, ")
