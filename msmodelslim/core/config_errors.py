"""The error vocabulary of every config protocol (modelslim_v1/v0, the VLM and diffusion ones, modelslim_convert):
each problem as `path: what is wrong`, e.g. `spec.process[1].qconfig.act.scope: 'per_tokn' is not one of
per_tensor, per_token, per_channel, per_group`."""
from __future__ import annotations

import math
from typing import Any, Callable, TypeVar

from pydantic import BaseModel, ValidationError

from msmodelslim.core.errors import ConfigError
from msmodelslim.core.roadmap import not_yet
from msmodelslim.core.saver_config import SAVER_TYPES
from msmodelslim.processor.registry import PROCESSORS

Model = TypeVar("Model", bound=BaseModel)
MAX_EXACT_INT = 2**53  # beyond this a number is not exact as a float (YAML/JSON readers differ)


def _where(loc: tuple) -> str:
    parts: list[str] = []
    for i, item in enumerate(loc):
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item in (*PROCESSORS, *SAVER_TYPES) and i > 0 and isinstance(loc[i - 1], int):
            continue  # the discriminator tag pydantic inserts after a list index
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts)


def format_validation_error(err: dict) -> str:
    """One pydantic error as `path: what is wrong`, naming what is allowed (and what is planned, core/roadmap.py)."""
    where = _where(err["loc"]) or "<top level>"
    kind, value = err["type"], err.get("input")
    if kind == "enum":
        allowed = err["ctx"]["expected"].replace("'", "").replace(" or ", ", ")
        field = str(err["loc"][-1])
        if field == "scope" and value == "per_head":  # a scope of attention activations, not of a linear's
            return (f"{where}: scope 'per_head' (one scale per attention head) is fa3_quant's (its qconfig or "
                    f"details); here use one of {allowed}")
        planned = not_yet(field, value)
        return f"{where}: {planned}; available: {allowed}" if planned else f"{where}: {value!r} is not one of {allowed}"
    if kind == "literal_error":
        return f"{where}: {value!r} is not allowed; expected {err['ctx']['expected']}"
    if kind == "extra_forbidden":
        planned = not_yet("spec field", err["loc"][-1]) if len(err["loc"]) == 2 else None
        if planned:
            return f"{where}: {planned}"
        return f"{where}: unknown key (check the spelling; see docs for the allowed fields)"
    if kind == "missing":
        return f"{where}: required field is missing"
    if kind == "union_tag_invalid":
        tag = err["ctx"]["tag"]
        kind, names = ("saver", SAVER_TYPES) if "save" in err["loc"] else ("processor", tuple(PROCESSORS))
        planned = not_yet(kind, tag)
        if planned:
            return f"{where}.type: {planned}; available: {', '.join(names)}"
        return f"{where}.type: unknown {kind} type {tag!r}; available: {', '.join(names)}"
    if kind == "union_tag_not_found":
        return f"{where}: missing 'type' (one of {', '.join(PROCESSORS)})"
    message = err["msg"].removeprefix("Value error, ")
    return f"{where}: {message}"


def validated(model: type[Model], data: Any, source: str,
              describe: Callable[[dict], str] = format_validation_error, note: str = "") -> Model:
    """`data` as `model`, or a ConfigError listing every problem, one `path: what is wrong` line each (`describe`);
    `note` follows "invalid configuration" in the message."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        lines = "\n  ".join(describe(e) for e in exc.errors())
        raise ConfigError(f"{source}: invalid configuration{note}:\n  {lines}") from None


def bad_numbers(data: Any) -> list[str]:
    """`path: problem` for every non-finite float and every int beyond ±2**53, anywhere in `data` (iterative: the
    nesting depth of data handed to parse_config directly is not bounded)."""
    found: list[str] = []
    seen: set[int] = set()  # containers shared through YAML aliases are walked once
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, bool):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            found.append(f"{where or '<top level>'}: {value} is not a finite number")
        elif isinstance(value, int) and abs(value) > MAX_EXACT_INT:
            found.append(f"{where or '<top level>'}: {value} is beyond ±2**53; use a smaller number")
        elif isinstance(value, (dict, list, tuple)) and id(value) not in seen:
            seen.add(id(value))
            items = value.items() if isinstance(value, dict) else enumerate(value)
            children = [(f"{where}[{k}]" if isinstance(value, (list, tuple)) else
                         f"{where}.{k}" if where else str(k), v) for k, v in items]
            stack.extend(reversed(children))
    return found


def refuse_bad_numbers(data: Any, source: str) -> None:
    bad = bad_numbers(data)
    if bad:
        lines = "\n  ".join(bad[:20])
        raise ConfigError(f"{source}: invalid configuration:\n  {lines}")
