"""Mixed precision under a bit budget: the candidate schemes, their honest bit count, and the solver.

Bit accounting (what the ascendv1 writer stores for one linear of shape [N, K], bias excluded: every scheme
stores the same float32 bias, formats.md A.4; format/ascendv1/tensors.py):

    FLOAT               16·N·K                        the weight in the deployment dtype (bf16/fp16); a float32
                                                      checkpoint stores 32, but 16 is what the engine holds
    W8A16 per channel   8·N·K + 32·N + 32·N           int8 codes, float32 weight_scale [N,1], weight_offset [N,1]
    W4A16 per group G   4·N·K + 32·N·(K/G) + 2·64     packed int4 codes, float32 weight_scale [N, K/G] (symmetric:
                                                      no offset is stored), weight_shape int64 [2]
    W4A16 per channel   4·N·K + 32·N + 2·64           the same with one scale per row

so W4A16 g64 costs 4.5 bits per weight (plus 128 bits per linear), W8A16 8 + 64/K. The average over a plan is
Σ bits / Σ N·K over the decoder-block linears it chooses for (lm_head and embeddings stay float in every plan and
are not counted).

Solver: a multiple-choice knapsack. Each linear i takes exactly one scheme s, with cost c[i,s] (bits) and estimated
error e[i,s]; minimise Σ e[i,s_i] subject to Σ c[i,s_i] ≤ B. Exact dynamic programming over the budget: each
linear's cheapest scheme is taken as the base (Σ min_s c[i,s] must fit, or the budget is impossible), and the DP
runs over the extra bits above the base, in units u of g·ceil(room / (g·resolution)) bits, where g is the gcd of
all extra costs, with every extra cost rounded UP to whole units. The chosen plan therefore always fits the true
budget; when room / g ≤ `resolution` (u = g: no rounding at all) it is the exact optimum; otherwise it is the
exact optimum of the rounded problem (it gives up at most one unit of slack per linear). Time and memory:
O(linears × schemes × resolution).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional

import numpy as np

from msmodelslim.core.errors import ConfigError, UnsupportedError

FLOAT_BITS = 16
SCALE_BITS = 32  # float32 weight_scale / weight_offset, as the writer stores them
SHAPE_BITS = 2 * 64  # W4A16's weight_shape: int64 [2]
WEIGHT_METHODS = ("minmax", "gptq", "ssz")


@dataclass(frozen=True)
class CandidateScheme:
    """One choice for a linear: `name` as the user spells it, `bits` of the codes, `group_size` (None: one scale
    per output channel), or float (bits 16, nothing quantized)."""

    name: str
    bits: int
    group_size: Optional[int] = None

    @property
    def is_float(self) -> bool:
        return self.bits == FLOAT_BITS

    def stored_bits(self, out_features: int, in_features: int) -> int:
        """The bits the writer stores for a [out, in] weight under this scheme (module docstring)."""
        n, k = out_features, in_features
        if self.is_float:
            return FLOAT_BITS * n * k
        if self.bits == 8:  # W8A16: per-channel scale and offset
            return 8 * n * k + 2 * SCALE_BITS * n
        groups = k // self.group_size if self.group_size else 1
        return 4 * n * k + SCALE_BITS * n * groups + SHAPE_BITS

    def fits(self, in_features: int) -> bool:
        return self.group_size is None or in_features % self.group_size == 0

    def qconfig(self, method: str) -> Optional[dict]:
        """The weight-only linear_quant qconfig (None for float), symmetric as the W4A16/W8A16 loaders need."""
        if self.is_float:
            return None
        weight = {"dtype": f"int{self.bits}", "scope": "per_group" if self.group_size else "per_channel",
                  "symmetric": True, "method": method}
        if self.group_size:
            weight["ext"] = {"group_size": self.group_size}
        return {"weight": weight}


_W4_GROUP = re.compile(r"w4a16_g(\d+)$")
KNOWN_SCHEMES = "w4a16_g<G> (e.g. w4a16_g64), w4a16 (per channel), w8a16 (per channel), float"


def parse_scheme(text: str) -> CandidateScheme:
    name = text.strip().lower()
    if name == "float":
        return CandidateScheme(name, FLOAT_BITS)
    if name == "w8a16":
        return CandidateScheme(name, 8)
    if name == "w4a16":
        return CandidateScheme(name, 4)
    match = _W4_GROUP.match(name)
    if match and int(match.group(1)) > 0:
        return CandidateScheme(name, 4, int(match.group(1)))
    if name.startswith(("w8a8", "w4a8", "w4a4", "fp8", "mx")) or "a8" in name or "a4" in name:
        raise UnsupportedError(f"mixed precision scheme {text!r} quantizes activations; the estimate (the weight "
                               f"error ΔW seen through the calibration inputs) covers weight-only schemes: use "
                               f"{KNOWN_SCHEMES}")
    raise ConfigError(f"unknown mixed precision scheme {text!r}; use {KNOWN_SCHEMES}")


def parse_schemes(text: str) -> list[CandidateScheme]:
    """The comma-separated --schemes; at least two distinct, at most one group size (ascendv1 stores one)."""
    schemes = [parse_scheme(t) for t in text.split(",") if t.strip()]
    names = [s.name for s in schemes]
    if len(set(names)) != len(names):
        raise ConfigError(f"--schemes {text!r} names a scheme twice")
    if len(schemes) < 2:
        raise ConfigError(f"--schemes {text!r}: mixed precision needs at least two schemes to choose from, e.g. "
                          f"w4a16_g64,w8a16,float")
    groups = sorted({s.group_size for s in schemes if s.group_size})
    if len(groups) > 1:
        raise ConfigError(f"--schemes {text!r} uses group sizes {groups}, but ascendv1 stores one group_size per "
                          f"model; keep one grouped scheme")
    return schemes


@dataclass(frozen=True)
class Choice:
    """Per linear, the schemes allowed (a grouped scheme whose group does not divide the input is left out):
    `options` index the candidate list, `costs` (bits) and `errors` follow them."""

    options: tuple[int, ...]
    costs: tuple[int, ...]  # bits
    errors: tuple[float, ...]


@dataclass
class Solution:
    picks: list[int]  # per linear, the index into its Choice's options
    bits: int
    error: float


def check_budget(budget_bits: float, min_bits: int, weights: int, cheapest: str) -> None:
    """Refuse a budget below the cheapest plan (before any weight is read: this needs shapes only)."""
    if budget_bits < min_bits:
        raise ConfigError(f"--bits {budget_bits / weights:.4g} is below the cheapest possible plan: every linear in "
                          f"its cheapest scheme ({cheapest}) averages {min_bits / weights:.4f} bits per weight "
                          f"(scales included); raise --bits or add a cheaper scheme")


def solve(choices: list[Choice], budget_bits: float, resolution: int = 200_000) -> Solution:
    """Multiple-choice knapsack by DP over the extra bits above each linear's cheapest scheme (module docstring)."""
    base = [int(np.argmin(c.costs)) for c in choices]
    base_bits = sum(c.costs[b] for c, b in zip(choices, base))
    room = math.floor(budget_bits) - base_bits
    if room < 0:
        raise ConfigError(f"the budget of {budget_bits:.0f} bits is below the cheapest plan ({base_bits} bits)")
    extras = [c - choice.costs[b] for choice, b in zip(choices, base) for c in choice.costs if c > choice.costs[b]]
    common = math.gcd(*extras) if extras else 1  # every extra cost is a multiple: exact in units of it
    unit = common * max(1, math.ceil(room / common / resolution))
    slots = room // unit + 1
    best = np.full(slots, np.inf)  # best[u]: least error with exactly u extra units spent
    best[0] = sum(c.errors[b] for c, b in zip(choices, base))
    taken = np.zeros((len(choices), slots), dtype=np.int16)
    for i, (choice, b) in enumerate(zip(choices, base)):
        new = best.copy()  # the base scheme: no extra units, no extra error
        pick = np.full(slots, b, dtype=np.int16)
        for s, (cost, error) in enumerate(zip(choice.costs, choice.errors)):
            if s == b:
                continue
            extra = math.ceil((cost - choice.costs[b]) / unit)
            if extra < 0 or extra >= slots:
                continue  # never cheaper than the base; too dear for the room
            delta = error - choice.errors[b]
            candidate = np.full(slots, np.inf)
            candidate[extra:] = best[: slots - extra] + delta
            better = candidate < new
            new[better], pick[better] = candidate[better], s
        best, taken[i] = new, pick
    spent = int(np.argmin(best))
    picks = [0] * len(choices)
    for i in range(len(choices) - 1, -1, -1):
        s = int(taken[i, spent])
        picks[i] = s
        if s != base[i]:
            spent -= math.ceil((choices[i].costs[s] - choices[i].costs[base[i]]) / unit)
    bits = sum(c.costs[s] for c, s in zip(choices, picks))
    error = sum(c.errors[s] for c, s in zip(choices, picks))
    return Solution(picks, bits, error)
