"""SQL put together from pieces, its parameters named in the pieces and numbered in one place.

A piece names its parameters (``$conversation``, ``$step``); ``numbered`` turns a statement
made of pieces into PostgreSQL's ``$1``, ``$2``, ... in the order the names first appear
(a name used twice is one parameter) and says which value goes where. No piece knows the
position of its parameters, so pieces of different modules compose without renumbering.
(Dollar-quoted strings, ``$tag$``, are left alone.)
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass

_NAMED = re.compile(r"\$([a-z_][a-z0-9_]*)(?![a-z0-9_$])")


@dataclass(frozen=True)
class Numbered:
    """A statement with positional parameters, and the name behind each."""

    text: str
    names: tuple[str, ...]

    def values(self, given: Mapping[str, object]) -> list[object]:
        """The parameters in order.

        Raises:
            KeyError: a name has no value.
        """
        return [given[name] for name in self.names]


@functools.cache
def numbered(statement: str) -> Numbered:
    """``statement`` with each ``$name`` numbered (cached: statements are a few shapes)."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in names:
            names.append(name)
        return f"${names.index(name) + 1}"

    return Numbered(_NAMED.sub(number, statement), tuple(names))
