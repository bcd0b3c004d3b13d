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


@dataclass(frozen=True)
class ExpertProjections:
    """What a family calls an expert's three projections on disk (and so in the model and the output):
    gate (SiLU-activated), up (multiplied in) and down (back to the hidden size)."""

    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"


GATE_UP_DOWN = ExpertProjections()
W1_W3_W2 = ExpertProjections("w1", "w3", "w2")  # Mixtral / MiniMax naming: w1 gate, w3 up, w2 down
# A per-expert projection name -> its part of a stacked gate_up_proj tensor (0 gate rows, 1 up rows; None: down_proj)
_STACKED_PART = {"gate_proj": 0, "up_proj": 1, "down_proj": None, "w1": 0, "w3": 1, "w2": None}
_EXPERT_WEIGHT = re.compile(r"^(?P<experts>.+\.experts)\.(?P<index>\d+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w3|w2)"
                            r"\.weight$")
_EXPERT_LINEAR = re.compile(r"^(?P<experts>.+\.experts)\.(?P<index>\d+)\.[A-Za-z0-9_]+$")


def expert_of(linear_name: str) -> Optional[tuple[str, int]]:
    """(experts module name, expert index) when `linear_name` is a routed expert's linear by the naming of
    formats.md A.5 (`….experts.<e>.<proj>`; shared experts are not routed), else None."""
    match = _EXPERT_LINEAR.match(linear_name)
    return (match["experts"], int(match["index"])) if match else None


class ExpertMLP(nn.Module):
    """One routed expert: down(act(gate(x)) * up(x)), bias-free, as in the fused module; its linears carry the
    family's on-disk names (`names`). With `limit` (Step-3.5's swiglu limit) the activated gate is clamped
    to at most `limit` and up to [-limit, limit] before they multiply, as the fused module does; with
    `clamp_before_activation` (DeepSeek-V4) the gate is clamped before the activation instead."""

    def __init__(self, hidden_size: int, intermediate_size: int, act_fn: nn.Module,
                 names: ExpertProjections = GATE_UP_DOWN, limit: Optional[float] = None,
                 clamp_before_activation: bool = False) -> None:
        super().__init__()
        self.names = names
        self.limit = limit
        self.clamp_before_activation = clamp_before_activation
        self.add_module(names.gate, nn.Linear(hidden_size, intermediate_size, bias=False))
        self.add_module(names.up, nn.Linear(hidden_size, intermediate_size, bias=False))
        self.add_module(names.down, nn.Linear(intermediate_size, hidden_size, bias=False))
        self.act_fn = act_fn

    def projection(self, role: str) -> nn.Linear:
        """The linear playing `role` ("gate", "up" or "down"), whatever the family calls it."""
        return getattr(self, getattr(self.names, role))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.projection("gate")(x), self.projection("up")(x)
        if self.limit is not None and self.clamp_before_activation:
            gate = gate.clamp(max=self.limit)
        gate = self.act_fn(gate)
        if self.limit is not None:
            up = up.clamp(min=-self.limit, max=self.limit)
            if not self.clamp_before_activation:
                gate = gate.clamp(max=self.limit)
        return self.projection("down")(gate * up)


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
    def from_fused(cls, fused: nn.Module, names: ExpertProjections = GATE_UP_DOWN,
                   limit: Optional[float] = None, clamp_before_activation: bool = False,
                   **kwargs) -> "UnfusedExperts":
        """Per-expert modules with the fused module's weights (on the meta device when it lives there); one per
        expert of `down_proj` (gate_up_proj may hold more rows, e.g. LongCat's identity experts)."""
        gate_up, down = fused.gate_up_proj, fused.down_proj
        num_experts, hidden, intermediate = down.shape
        with torch.device(gate_up.device):
            experts = cls((ExpertMLP(hidden, intermediate, copy.deepcopy(fused.act_fn), names, limit,
                                     clamp_before_activation) for _ in range(num_experts)), **kwargs)
        experts.to(gate_up.dtype)
        if gate_up.device.type != "meta":
            with torch.no_grad():
                for e, expert in enumerate(experts):
                    expert.projection("gate").weight.copy_(gate_up[e, :intermediate])
                    expert.projection("up").weight.copy_(gate_up[e, intermediate:])
                    expert.projection("down").weight.copy_(down[e])
        return experts


class UnfusedExpertsWithIdentity(UnfusedExperts):
    """Routed experts followed by `num_identity` zero-computation experts (LongCat-Flash): router indices
    len(self) .. len(self)+num_identity-1 pick an expert that returns its input, weighted like any other."""

    def __init__(self, experts=(), num_identity: int = 0) -> None:
        super().__init__(experts)
        self.num_identity = num_identity

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        real = top_k_index < len(self)
        # identity picks become the "no expert" index for the routed part; their weights multiply the input
        routed = super().forward(hidden_states, torch.where(real, top_k_index, len(self)), top_k_weights)
        identity_weight = (top_k_weights * ~real).sum(dim=-1, keepdim=True)
        return routed + hidden_states * identity_weight.to(hidden_states.dtype)


class UnfusedExpertsSkippingZeroWeights(UnfusedExperts):
    """Routed experts whose caller sends some tokens with router weight 0 that are not routed to them: LongCat-
    Flash in transformers >= 5.25, whose MoE adds its zero-computation experts' output itself and hands their
    picks to the routed experts as dummy indices with weight 0. Those picks contribute nothing to the output;
    here they are not forwarded at all, so that calibration statistics see only the tokens really routed."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden_states, torch.where(top_k_weights == 0, len(self), top_k_index), top_k_weights)


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


def unfuse_experts(model: nn.Module, names: ExpertProjections = GATE_UP_DOWN) -> int:
    """Replace every fused experts module of `model` by an `UnfusedExperts` (in place); returns how many.
    `names`: what the family's checkpoint calls each expert's projections (MiniMax: w1/w3/w2).

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
        setattr(model.get_submodule(parent_name) if parent_name else model, child,
                UnfusedExperts.from_fused(module, names))
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
        for e, expert in enumerate(experts):
            names = getattr(expert, "names", GATE_UP_DOWN)  # quantized or not, under the family's names
            for proj in (names.gate, names.up, names.down):
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
    """The stacked tensor holding per-expert weight `name` (`…experts.<e>.<proj>.weight`, proj gate_proj/up_proj/
    down_proj or w1/w3/w2), or None."""
    match = _EXPERT_WEIGHT.match(name)
    if match is None:
        return None
    experts, index, part = match["experts"], int(match["index"]), _STACKED_PART[match["proj"]]
    if part is None:
        return StackedSlice(f"{experts}.down_proj", index, None)
    return StackedSlice(f"{experts}.gate_up_proj", index, part)


def stacked_per_projection_source(name: str) -> Optional[StackedSlice]:
    """For checkpoints that stack each projection separately next to the experts module (Step-3.5:
    `<block>.gate_proj.weight`, `<block>.up_proj.weight` [E, I, H] and `<block>.down_proj.weight` [E, H, I] for
    the experts at `<block>.experts`): where per-expert weight `name` lives, or None."""
    match = _EXPERT_WEIGHT.match(name)
    if match is None:
        return None
    block = match["experts"].rpartition(".")[0]
    return StackedSlice(f"{block}.{match['proj']}.weight", int(match["index"]), None)
