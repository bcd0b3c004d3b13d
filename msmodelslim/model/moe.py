"""Mixture-of-experts support: routed experts as one `nn.Linear` per projection and expert.

Hugging Face transformers (v5) keeps the routed experts of a layer fused in memory: `gate_up_proj` [E, 2I, H]
(each expert's gate rows, then its up rows) and `down_proj` [E, H, I], with one forward that routes tokens. The
checkpoint on disk and the ascendv1 format both name one tensor set per expert,
`<layer>.mlp.experts.<e>.{gate,up,down}_proj.*` (formats.md A.5). `UnfusedExperts` is the same computation
with per-expert `nn.Linear` modules, so that every linear-based algorithm (observers, GPTQ, QuantLinear) works
on experts unchanged, hooks on an expert see exactly the tokens routed to it, and state-dict names equal the
on-disk names.

Checkpoints that store experts stacked (`<layer>.mlp.experts.gate_up_proj` / `.down_proj`, the in-memory layout)
load too: `stacked_source` says which slice of which stacked tensor a per-expert name is.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import nn

from msmodelslim.core.errors import UnsupportedError

EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_EXPERT_WEIGHT = re.compile(r"^(?P<experts>.+\.experts)\.(?P<index>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)"
                            r"\.weight$")
_EXPERT_LINEAR = re.compile(r"^(?P<experts>.+\.experts)\.(?P<index>\d+)\.[A-Za-z0-9_]+$")


def expert_of(linear_name: str) -> Optional[tuple[str, int]]:
    """(experts module name, expert index) when `linear_name` is a routed expert's linear by the naming of
    formats.md A.5 (`….experts.<e>.<proj>`; shared experts are not routed), else None."""
    match = _EXPERT_LINEAR.match(linear_name)
    return (match["experts"], int(match["index"])) if match else None


class ExpertMLP(nn.Module):
    """One routed expert: down(act(gate(x)) * up(x)), bias-free, as in the fused module."""

    def __init__(self, hidden_size: int, intermediate_size: int, act_fn: nn.Module) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class UnfusedExperts(nn.ModuleList):
    """The routed experts of one MoE layer, expert e at child `e` (so names are `experts.<e>.gate_proj`).

    A ModuleList (rather than a module holding one) because the child names must be the bare expert indices.
    `forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])` computes what the fused
    transformers module computes: each expert that was picked runs on its tokens, its output is weighted by
    the router weight and added into the token's row, experts in increasing index order. An index equal to
    the number of experts (transformers' "no expert" padding) is skipped.
    """

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            # [E+1, k, T]: which (slot, token) pairs picked each expert
            picked = nn.functional.one_hot(top_k_index, num_classes=len(self) + 1).permute(2, 1, 0)
            hit = (picked[: len(self)].sum(dim=(1, 2)) > 0).nonzero().flatten().tolist()
        for e in hit:
            slot, token = torch.where(picked[e])
            y = self[e](hidden_states[token]) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out

    @classmethod
    def from_fused(cls, fused: nn.Module) -> "UnfusedExperts":
        """Per-expert modules with the fused module's weights (on the meta device when it lives there)."""
        gate_up, down = fused.gate_up_proj, fused.down_proj
        num_experts, two_i, hidden = gate_up.shape
        intermediate = two_i // 2
        with torch.device(gate_up.device):
            experts = cls(ExpertMLP(hidden, intermediate, copy.deepcopy(fused.act_fn)) for _ in range(num_experts))
        experts.to(gate_up.dtype)
        if gate_up.device.type != "meta":
            with torch.no_grad():
                for e, expert in enumerate(experts):
                    expert.gate_proj.weight.copy_(gate_up[e, :intermediate])
                    expert.up_proj.weight.copy_(gate_up[e, intermediate:])
                    expert.down_proj.weight.copy_(down[e])
        return experts


def _fused_layout_problem(module: nn.Module) -> Optional[str]:
    """Why a module with 3-D `gate_up_proj`/`down_proj` cannot be unfused exactly; None when it can."""
    flags = {"has_bias": False, "is_transposed": False, "is_concatenated": True, "has_gate": True,
             "has_post_expert_norm": False}
    for flag, supported in flags.items():
        if getattr(module, flag, supported) != supported:
            return f"{flag}={not supported}"
    gate = getattr(type(module), "_apply_gate", None)
    if gate is not None and getattr(gate, "__name__", "") != "_default_apply_gate":
        return "a custom gate activation (_apply_gate)"
    if not hasattr(module, "act_fn"):
        return "no act_fn"
    e, two_i, h = module.gate_up_proj.shape
    if two_i % 2 or tuple(module.down_proj.shape) != (e, h, two_i // 2):
        return f"shapes gate_up_proj {tuple(module.gate_up_proj.shape)}, down_proj {tuple(module.down_proj.shape)}"
    return None


def is_fused_experts(module: nn.Module) -> bool:
    """True for transformers' fused experts: 3-D parameters `gate_up_proj` and `down_proj`."""
    params = [getattr(module, n, None) for n in ("gate_up_proj", "down_proj")]
    return all(isinstance(p, torch.Tensor) and p.dim() == 3 for p in params)


def unfuse_experts(model: nn.Module) -> int:
    """Replace every fused experts module of `model` by an `UnfusedExperts` (in place); returns how many.

    Works on a meta-device skeleton (weights are loaded later by state-dict name) and on a loaded model
    (weights are copied). A fused layout whose forward differs from gate/up-then-down (biases, transposed or
    interleaved weights, a custom gate) is refused rather than unfused into a different computation.
    """
    fused = [(name, m) for name, m in model.named_modules() if is_fused_experts(m)]
    for name, module in fused:
        problem = _fused_layout_problem(module)
        if problem is not None:
            raise UnsupportedError(f"{name} ({type(module).__name__}) stores its experts with {problem}; "
                                   f"only the gate/up/down layout without biases can be split per expert")
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, UnfusedExperts.from_fused(module))
    return len(fused)


def experts_modules(root: nn.Module, prefix: str = "") -> Iterator[tuple[str, UnfusedExperts]]:
    """(full name, module) of every `UnfusedExperts` under `root`, which lives at `prefix`."""
    for name, module in root.named_modules():
        if isinstance(module, UnfusedExperts):
            yield ".".join(p for p in (prefix, name) if p), module


def routed_expert_linears(root: nn.Module, prefix: str = "") -> dict[str, tuple[str, int]]:
    """{full linear name: (experts module name, expert index)} for every linear inside routed experts."""
    found: dict[str, tuple[str, int]] = {}
    for experts_name, experts in experts_modules(root, prefix):
        for e in range(len(experts)):
            for proj in EXPERT_PROJECTIONS:
                found[f"{experts_name}.{e}.{proj}"] = (experts_name, e)
    return found


# ---- stacked checkpoints -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StackedSlice:
    """Where a per-expert weight lives in a stacked checkpoint: `tensor[index]`, rows `part` of 2 halves
    for gate (0) / up (1) inside gate_up_proj, or the whole matrix (part None) for down_proj."""

    tensor: str
    index: int
    part: Optional[int]

    def take(self, stacked: torch.Tensor) -> torch.Tensor:
        matrix = stacked[self.index]
        if self.part is not None:
            half = matrix.shape[0] // 2
            matrix = matrix[self.part * half : (self.part + 1) * half]
        return matrix.clone()  # its own storage: experts are written as separate tensors


def stacked_source(name: str) -> Optional[StackedSlice]:
    """The stacked tensor holding per-expert weight `name` (`…experts.<e>.<proj>.weight`), or None."""
    match = _EXPERT_WEIGHT.match(name)
    if match is None:
        return None
    experts, index, proj = match["experts"], int(match["index"]), match["proj"]
    if proj == "down_proj":
        return StackedSlice(f"{experts}.down_proj", index, None)
    return StackedSlice(f"{experts}.gate_up_proj", index, 0 if proj == "gate_proj" else 1)
