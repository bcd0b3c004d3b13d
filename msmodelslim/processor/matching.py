"""Module-name selection with include/exclude wildcards (fnmatch, plus `{a,b}` alternatives)."""
from __future__ import annotations

import fnmatch
import re
from typing import Annotated

from pydantic import AfterValidator

from msmodelslim.core.errors import ConfigError

MAX_ALTERNATIVES = 1024  # far more than any real rule needs; 26 groups of {a,b} would be 67 million patterns


class PatternError(ConfigError, ValueError):
    """A ConfigError (exit 2) that pydantic also reports with the field's path (it collects ValueErrors)."""


def brace_alternatives(pattern: str) -> int:
    """How many patterns `expand_braces` returns, without expanding: the product over matched `{...}` groups
    of their top-level alternative counts (a `}` closes the latest open `{`; unmatched braces are literal)."""
    open_groups: list[int] = []  # commas seen so far at the top level of each open group
    count = 1
    for char in pattern:
        if char == "{":
            open_groups.append(0)
        elif char == "}" and open_groups:
            count *= open_groups.pop() + 1
            if count > MAX_ALTERNATIVES:  # stop early: the product may be astronomically large
                break
        elif char == "," and open_groups:
            open_groups[-1] += 1
    return count


def check_pattern(pattern: str) -> str:
    """The pattern, or a PatternError when its braces expand to more than MAX_ALTERNATIVES patterns."""
    if brace_alternatives(pattern) > MAX_ALTERNATIVES:
        raise PatternError(f"pattern {pattern!r} expands to more than {MAX_ALTERNATIVES} alternatives through its "
                           f"{{a,b}} groups; use wildcards (*, ?) or split it into several patterns")
    return pattern


# The type of every include/exclude field: the check runs at config load time and names the field's path.
Pattern = Annotated[str, AfterValidator(check_pattern)]


def expand_braces(pattern: str) -> list[str]:
    """'*.{q,k}_proj' -> ['*.q_proj', '*.k_proj'] (nested braces expand too)."""
    check_pattern(pattern)
    out: list[str] = []
    todo = [pattern]  # a stack, not recursion: thousands of one-alternative groups must not overflow it
    while todo:
        current = todo.pop()
        match = re.search(r"\{([^{}]*)\}", current)
        if not match:
            out.append(current)
            continue
        head, tail = current[: match.start()], current[match.end() :]
        todo.extend(head + alt + tail for alt in reversed(match.group(1).split(",")))
    return out


def matches_any(name: str, patterns: list[str]) -> str | None:
    """The first pattern that matches `name`, or None."""
    for pattern in patterns:
        if any(fnmatch.fnmatchcase(name, p) for p in expand_braces(pattern)):
            return pattern
    return None


def select(names: list[str], include: list[str], exclude: list[str]) -> list[str]:
    """Names matched by include and not by exclude (exclude always wins)."""
    return [n for n in names if matches_any(n, include) and not matches_any(n, exclude)]


def unused_patterns(names: list[str], patterns: list[str]) -> list[str]:
    return [p for p in patterns if not any(matches_any(n, [p]) for n in names)]
