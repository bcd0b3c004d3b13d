"""The structure of a decoder-only model that no adapter describes, inferred from the built (meta-device) model.

Used by the default adapter (model/default.py). Module names say where things are; small numerical probes on
copies of single modules say whether an algorithm's algebra holds for them. A norm named like Llama's that
scales by (1 + weight), as Gemma's does, must not be smoothed or rotated as if it scaled by its weight:

- decoder layers: the nn.ModuleList of config.json's num_hidden_layers blocks (the shallowest such list);
- fused groups: q/k/v_proj and gate/up_proj wherever the blocks have them (the engine fuses them);
- smoothing (`LLAMA_SMOOTH_SUBGRAPHS`), kind by kind, only when every block is Llama-shaped: its parametrised
  children are exactly input_layernorm, self_attn, post_attention_layernorm and mlp; self_attn's linears are
  q/k/v/o_proj (other parameters only in q_norm/k_norm); mlp is exactly gate/up/down_proj. Then
    norm-linear  each norm's output channel j is proportional to its weight_j (and bias_j): folding 1/s into
                 the norm and s into a reader leaves the reader's output unchanged (probe);
    ov           v_proj and o_proj have the shapes of config.json's attention heads;
    up-down      folding 1/s into up_proj's rows and s into down_proj's columns leaves the MLP unchanged (probe
                 on a shrunken copy);
- rotation (`LLAMA_ROTATION`): all three kinds, every norm (the final one too) an RMSNorm that scales by its
  weight (probe), and the model exactly model.embed_tokens -> model.layers -> model.norm -> lm_head, so nothing
  else reads or writes the residual stream.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from msmodelslim.core.errors import InvalidModelError
from msmodelslim.model.interface import LLAMA_ROTATION, LLAMA_SMOOTH_SUBGRAPHS, AttentionShape, ModelStructure
from msmodelslim.model.moe import UnfusedExperts

LLAMA_BLOCK = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
LLAMA_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
LLAMA_MLP = ("gate_proj", "up_proj", "down_proj")
FUSABLE = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
PROBE_TOLERANCE = 1e-9  # the probes run in float64: an algebraic identity holds to rounding


@dataclass(frozen=True)
class InferredStructure:
    structure: ModelStructure
    layer_class: str
    num_layers: int
    routed_experts: int  # fused expert modules split into per-expert linears
    reasons: tuple[str, ...]  # why smoothing kinds or the rotation are off

    def describe(self) -> str:
        s = self.structure
        kinds = sorted({g.kind for g in s.smooth_subgraphs})
        groups = ", ".join("+".join(g) for g in s.fused_groups) or "none"
        text = (f"{self.num_layers} decoder layers at {s.decoder_layers} ({self.layer_class}); smoothing: "
                f"{', '.join(kinds) or 'none'}; QuaRot rotation: {'yes' if s.rotation else 'no'}; fused groups: "
                f"{groups}; routed experts split per expert in {self.routed_experts} layer(s)")
        return text + (f" ({'; '.join(self.reasons)})" if self.reasons else "")


def _num_hidden_layers(config) -> Optional[int]:
    for part in (config, getattr(config, "text_config", None)):
        n = getattr(part, "num_hidden_layers", None)
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            return n
    return None


def find_decoder_layers(model: nn.Module, config) -> str:
    """The name of the nn.ModuleList holding the decoder layers: of config.json's num_hidden_layers length, the
    shallowest (an experts list deeper inside may have the same length); without that number, the largest."""
    lists = [(name, m) for name, m in model.named_modules()
             if name and isinstance(m, nn.ModuleList) and not isinstance(m, UnfusedExperts) and len(m)]
    wanted = _num_hidden_layers(config)
    size = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731 - meta tensors know their numel
    if wanted is not None:
        lists = [(name, m) for name, m in lists if len(m) == wanted]
    if not lists:
        raise InvalidModelError(
            f"the default adapter finds no nn.ModuleList of {wanted or 'any number of'} decoder layers in "
            f"{type(model).__name__}; describe the model in an adapter (docs/adding_a_model.md)")
    lists.sort(key=lambda item: (item[0].count("."), -size(item[1])))
    return lists[0][0]


def _with_parameters(module: nn.Module) -> dict[str, nn.Module]:
    """Direct children that hold parameters (dropouts, activations and rotary tables do not count)."""
    return {n: c for n, c in module.named_children() if next(c.parameters(), None) is not None}


def llama_shape_problem(block: nn.Module) -> Optional[str]:
    """None when the block is Llama-shaped (see the module docstring), else what differs."""
    children = _with_parameters(block)
    if set(children) != set(LLAMA_BLOCK):
        return f"blocks hold {', '.join(sorted(children))}, not Llama's {', '.join(LLAMA_BLOCK)}"
    attention = _with_parameters(children["self_attn"])
    linears = {n for n, c in attention.items() if type(c) is nn.Linear}
    if linears != set(LLAMA_ATTENTION) or set(attention) - linears - {"q_norm", "k_norm"}:
        return f"self_attn holds {', '.join(sorted(attention))}, not {', '.join(LLAMA_ATTENTION)} (+ q_norm, k_norm)"
    mlp = _with_parameters(children["mlp"])
    if set(mlp) != set(LLAMA_MLP) or any(type(c) is not nn.Linear for c in mlp.values()):
        return f"mlp holds {', '.join(sorted(mlp))}, not the linears {', '.join(LLAMA_MLP)}"
    return None


# ---- probes: float64 copies of single modules with random parameters ---------------------------------------
def _random_copy(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """A CPU float64 copy of a (meta-device) module, its parameters drawn from [0.5, 1.5)."""
    clone = copy.deepcopy(module)
    for owner in clone.modules():
        for name, p in list(owner._parameters.items()):
            if p is not None:
                values = torch.rand(p.shape, generator=generator, dtype=torch.float64) + 0.5
                owner._parameters[name] = nn.Parameter(values, requires_grad=False)
    for owner in clone.modules():  # meta buffers have no values; the probes are meant for modules without
        for name, b in list(owner._buffers.items()):
            if b is not None and b.is_meta:
                raise ValueError(f"buffer {name} has no values")
    return clone.double()


def _probe(check: Callable[[torch.Generator], bool]) -> bool:
    """Run a probe; a module whose forward cannot run on such a copy fails it."""
    try:
        with torch.no_grad():
            return bool(check(torch.Generator().manual_seed(0)))
    except (RuntimeError, TypeError, ValueError, AttributeError, IndexError, KeyError):
        return False


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=PROBE_TOLERANCE, atol=PROBE_TOLERANCE)


def norm_scales_by_weight(norm: nn.Module) -> bool:
    """Smoothing's premise: dividing the norm's weight (and bias) by s divides its output by s, channel-wise."""
    def check(g: torch.Generator) -> bool:
        n = _random_copy(norm, g)
        hidden = n.weight.shape[-1]
        x = torch.randn(4, hidden, generator=g, dtype=torch.float64)
        s = torch.rand(hidden, generator=g, dtype=torch.float64) + 0.5
        before = n(x)
        n.weight.div_(s)
        if getattr(n, "bias", None) is not None:
            n.bias.div_(s)
        return _close(n(x), before / s)

    return _probe(check)


def is_weighted_rms_norm(norm: nn.Module) -> bool:
    """Rotation's premise: y = weight * x / rms(x) with no bias, so the weight folds into the readers and what
    remains, x / rms(x), commutes with any rotation of x."""
    def check(g: torch.Generator) -> bool:
        n = _random_copy(norm, g)
        if getattr(n, "bias", None) is not None:
            return False
        weight = n.weight.clone()
        x = torch.randn(4, weight.shape[-1], generator=g, dtype=torch.float64)
        weighted = n(x)
        n.weight.fill_(1.0)
        unit = n(x)
        row_scale = unit / x  # x / rms(x): one value per row (norms compute it in float32, hence the tolerance)
        same_per_row = bool(torch.allclose(row_scale, row_scale[:, :1].expand_as(row_scale), rtol=1e-5, atol=0))
        unit_rms = bool(torch.allclose(unit.pow(2).mean(dim=-1), torch.ones(4, dtype=torch.float64), atol=1e-3))
        return _close(weighted, unit * weight) and same_per_row and unit_rms

    return _probe(check)


PROBE_WIDTH, PROBE_INTERMEDIATE = 8, 16


def mlp_up_down_exact(mlp: nn.Module) -> bool:
    """Up-down smoothing's premise: the MLP is down(act(gate(x)) * up(x)), so up_proj's output rows divided by s
    and down_proj's input columns multiplied by s leave it unchanged. Probed on a copy with small linears."""
    def check(g: torch.Generator) -> bool:
        small = copy.deepcopy(mlp)
        for name, (fan_in, fan_out) in {"gate_proj": (PROBE_WIDTH, PROBE_INTERMEDIATE),
                                        "up_proj": (PROBE_WIDTH, PROBE_INTERMEDIATE),
                                        "down_proj": (PROBE_INTERMEDIATE, PROBE_WIDTH)}.items():
            setattr(small, name, nn.Linear(fan_in, fan_out, bias=getattr(mlp, name).bias is not None, device="meta"))
        small = _random_copy(small, g)
        x = torch.randn(5, PROBE_WIDTH, generator=g, dtype=torch.float64)
        s = torch.rand(PROBE_INTERMEDIATE, generator=g, dtype=torch.float64) + 0.5
        before = small(x)
        small.up_proj.weight.div_(s.unsqueeze(1))
        if small.up_proj.bias is not None:
            small.up_proj.bias.div_(s)
        small.down_proj.weight.mul_(s.unsqueeze(0))
        return _close(small(x), before)

    return _probe(check)


def attention_matches(attention: nn.Module, shape: Optional[AttentionShape]) -> bool:
    """'ov' smoothing's premise: v_proj rows and o_proj columns are config.json's heads (GQA)."""
    if shape is None:
        return False
    kv, q = shape.num_kv_heads * shape.head_dim, shape.num_heads * shape.head_dim
    return (attention.q_proj.out_features == q and attention.k_proj.out_features == kv
            and attention.v_proj.out_features == kv and attention.o_proj.in_features == q)


# ---- the inference -------------------------------------------------------------------------------------------
def _first_of_each_class(modules: list[nn.Module]) -> list[nn.Module]:
    seen: dict[type, nn.Module] = {}
    for m in modules:
        seen.setdefault(type(m), m)
    return list(seen.values())


def _fused_groups(blocks: list[nn.Module]) -> tuple[tuple[str, ...], ...]:
    leaves = {name.rsplit(".", 1)[-1] for block in blocks for name, m in block.named_modules()
              if isinstance(m, nn.Linear)}
    return tuple(group for group in FUSABLE if set(group) <= leaves)


def _smoothing_kinds(blocks: list[nn.Module], attention: Optional[AttentionShape]) -> tuple[set[str], list[str]]:
    """The Llama subgraph kinds every block supports, and why the others are off."""
    problem = next((p for p in map(llama_shape_problem, blocks) if p is not None), None)
    if problem is not None:
        return set(), [f"not Llama-shaped: {problem}"]
    kinds, reasons = set(), []
    norms = _first_of_each_class([b.get_submodule(n) for b in blocks for n in (LLAMA_BLOCK[0], LLAMA_BLOCK[2])])
    if all(map(norm_scales_by_weight, norms)):
        kinds.add("norm-linear")
    else:
        reasons.append(f"{', '.join(sorted({type(n).__name__ for n in norms}))} does not scale by its weight, "
                       f"so no norm-linear smoothing")
    if all(attention_matches(b.self_attn, attention) for b in blocks):
        kinds.add("ov")
    else:
        reasons.append("v_proj/o_proj do not have config.json's attention head shapes, so no ov smoothing")
    if all(map(mlp_up_down_exact, _first_of_each_class([b.mlp for b in blocks]))):
        kinds.add("up-down")
    else:
        reasons.append("the MLP is not down(act(gate(x)) * up(x)), so no up-down smoothing")
    return kinds, reasons


def _rotation_problem(model: nn.Module, layers: str, blocks: list[nn.Module], kinds: set[str]) -> Optional[str]:
    if kinds != {"norm-linear", "ov", "up-down"}:
        return "smoothing is not fully supported"
    if layers != "model.layers" or set(_with_parameters(model)) != {"model", "lm_head"} \
            or set(_with_parameters(model.model)) != {"embed_tokens", "layers", "norm"}:
        return "the model is not exactly model.embed_tokens -> model.layers -> model.norm -> lm_head"
    if not isinstance(model.model.embed_tokens, nn.Embedding) or type(model.lm_head) is not nn.Linear:
        return "embed_tokens is not an embedding table or lm_head not a linear"
    norms = [model.model.norm] + [b.get_submodule(n) for b in blocks for n in (LLAMA_BLOCK[0], LLAMA_BLOCK[2])]
    if not all(map(is_weighted_rms_norm, _first_of_each_class(norms))):
        return "its norms are not RMSNorms scaling by their weight"
    return None


def infer_structure(model: nn.Module, config, attention: Optional[AttentionShape], routed_experts: int = 0
                    ) -> InferredStructure:
    """The structure of `model` (built on the meta device, fused experts already split)."""
    layers = find_decoder_layers(model, config)
    blocks = list(model.get_submodule(layers))
    kinds, reasons = _smoothing_kinds(blocks, attention)
    rotation_problem = _rotation_problem(model, layers, blocks, kinds)
    if rotation_problem is not None and kinds:
        reasons.append(f"no rotation: {rotation_problem}")
    structure = ModelStructure(
        decoder_layers=layers,
        fused_groups=_fused_groups(blocks),
        smooth_subgraphs=tuple(g for g in LLAMA_SMOOTH_SUBGRAPHS if g.kind in kinds),
        rotation=LLAMA_ROTATION if rotation_problem is None else None,
    )
    classes = sorted({type(b).__name__ for b in blocks})
    return InferredStructure(structure, "/".join(classes), len(blocks), routed_experts, tuple(reasons))
