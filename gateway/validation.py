"""Pydantic validation errors in plain words: one problem per field, named the way the person wrote it.

Pydantic's own messages ("Input should be greater than or equal to 1", "Value error, ...") speak of its
internals; these say what the value must be and what was given, so a CLI can name the flag and an API the field.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

_MUST_BE: dict[str, Callable[[dict[str, Any]], str]] = {
    "greater_than": lambda c: f"must be greater than {c['gt']:g}",
    "greater_than_equal": lambda c: f"must be at least {c['ge']:g}",
    "less_than": lambda c: f"must be less than {c['lt']:g}",
    "less_than_equal": lambda c: f"must be at most {c['le']:g}",
    "literal_error": lambda c: f"must be {c['expected']}",
    "enum": lambda c: f"must be {c['expected']}",
    "string_pattern_mismatch": lambda c: f"must match {c['pattern']}",
    "string_too_short": lambda c: f"must have at least {c['min_length']} characters",
    "too_short": lambda c: f"must have at least {c['min_length']} items",
    "too_long": lambda c: f"must have at most {c['max_length']} items",
}
_TYPE_WORDS = {
    "int": "an integer", "float": "a number", "bool": "true or false", "string": "a string", "dict": "a mapping",
    "list": "a list", "model": "a mapping",
}


@dataclass(frozen=True)
class FieldProblem:
    """One invalid field: where (a dotted path), what it must be, and the value given (when there was one)."""

    where: str
    message: str
    given: Any = None
    has_input: bool = False

    def __str__(self) -> str:
        given = f", not {self.given!r}" if self.has_input and not isinstance(self.given, dict | list) else ""
        return f"{self.where} {self.message}{given}" if self.where else f"{self.message}{given}"


def field_problems(exc: ValidationError, *, skip_root: Sequence[str] = ()) -> list[FieldProblem]:
    """The problems of ``exc`` in plain words; ``skip_root`` drops leading path parts (a wrapper's name)."""
    problems = []
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        while loc and loc[0] in skip_root:
            loc.pop(0)
        problems.append(FieldProblem(".".join(loc), _message(error), error.get("input"),
                                     has_input=error["type"] not in ("missing", "extra_forbidden")))
    return problems


def _message(error: Any) -> str:
    kind: str = error["type"]
    context = error.get("ctx") or {}
    if kind in _MUST_BE:
        return _MUST_BE[kind](context)
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        return "is not a known field"
    if kind == "value_error":
        return str(error["msg"]).removeprefix("Value error, ")
    for prefix, words in _TYPE_WORDS.items():
        if kind.startswith(prefix + "_") or kind == prefix + "_type":
            return f"must be {words}"
    return str(error["msg"])
