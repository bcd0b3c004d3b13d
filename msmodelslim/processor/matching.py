"""Module-name selection with include/exclude wildcards (fnmatch, plus `{a,b}` alternatives)."""
from __future__ import annotations

import fnmatch
import re


def expand_braces(pattern: str) -> list[str]:
    """'*.{q,k}_proj' -> ['*.q_proj', '*.k_proj'] (nested braces expand too)."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [p for alt in match.group(1).split(",") for p in expand_braces(head + alt + tail)]


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
