"""`quarot` with `online: true`: QuaRot's online rotations (Ashkboos et al. 2024, §4) of the two inputs that the
offline rotation cannot reach, as the established tool places them (protocol.md §2.4 and §4.4):

- every o_proj: a heads rotation (`heads_rotation`, [H, H]) mixing the attention heads, on top of the offline
  per-head rotation of the values;
- down_proj of the decoder layers in `down_proj_online_layers`: a Kronecker rotation R_m ⊗ R_n over the
  intermediate size (`kronecker_rotation_m` [m, m], `kronecker_rotation_n` [n, n]).

    - type: quarot
      online: true
      down_proj_online_layers: [0, 1, 2]   # decoder layer indices
      max_tp_size: 4                       # the rotations stay inside each of up to 4 tensor-parallel shards

Exact in float (ir/online_rotation.py). Both inputs are split across tensor-parallel ranks (row-parallel layers), so
a rotation must not mix channels of different shards: the heads rotation is block-diagonal over `max_tp_size`
groups of heads, and R_m block-diagonal over `max_tp_size` groups of rows of the [m, n] view (each shard holds m/tp
rows). Each block is a random-signed Hadamard matrix where one of its order is known (a random orthogonal one
otherwise, logged). m and n are chosen to keep the run-time cost m/tp + n per element small. With quarot's
`block_size` b > 0 the down_proj rotation is block-diagonal in blocks of b instead (R_m = I, R_n of order b), like
the offline rotation of the residual.

Only layers a later step quantizes are rotated: a float layer gains nothing. vLLM-Ascend's released W4A4 schemes do
not load these tensors (formats.md A.3, A.8 item 10); our reader and `msmodelslim eval` apply them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from msmodelslim.core.errors import UnsupportedError
from msmodelslim.core.logging import get_logger
from msmodelslim.ir.online_rotation import HEADS_ROTATION, KRONECKER_M, KRONECKER_N
from msmodelslim.model.interface import EVERY_EXPERT, ModelStructure
from msmodelslim.processor.quarot.config import QuaRotConfig
from msmodelslim.processor.quarot.hadamard import block_diagonal, hadamard, random_rotation
from msmodelslim.processor.quarot.rotate import matching

log = get_logger("quarot")


def _rotation_blocks(order: int, shards: int, seed: int, what: str) -> torch.Tensor:
    """block_diag of `shards` copies of one random-signed Hadamard of `order` (float32)."""
    q, is_hadamard = random_rotation(order, seed)
    if not is_hadamard:
        log.warning("quarot: no Hadamard matrix of order %d is known here for the %s; using a random orthogonal one "
                    "(still exact in float, spreads outliers less evenly)", order, what)
    return block_diagonal(q, shards).float()


def heads_rotation(num_heads: int, max_tp_size: int, seed: int) -> torch.Tensor:
    """[H, H], block-diagonal over max_tp_size shards of heads."""
    if num_heads % max_tp_size:
        raise UnsupportedError(f"quarot online: o_proj's heads rotation mixes heads inside each of max_tp_size = "
                               f"{max_tp_size} tensor-parallel shards, but {num_heads} attention heads do not split "
                               f"into {max_tp_size}; set max_tp_size to a power of 2 dividing {num_heads} (1 at least)")
    return _rotation_blocks(num_heads // max_tp_size, max_tp_size, seed, "heads rotation")


def kronecker_factors(size: int, max_tp_size: int) -> tuple[int, int]:
    """(m, n) with m·n = size and max_tp_size | m, preferring Hadamard orders for m/tp and n, then the lowest
    run-time cost m/tp + n (then the larger n)."""
    if size % max_tp_size:
        raise UnsupportedError(f"quarot online: down_proj's input size {size} does not split into max_tp_size = "
                               f"{max_tp_size} tensor-parallel shards; lower max_tp_size")
    candidates = sorted(((m, size // m) for m in range(max_tp_size, size + 1, max_tp_size) if size % m == 0),
                        key=lambda mn: (mn[0] // max_tp_size + mn[1], -mn[1]))
    # cheapest first: large Hadamard orders (slow to construct) are only tried when no cheaper split has one
    return next((mn for mn in candidates if hadamard(mn[0] // max_tp_size) is not None and hadamard(mn[1]) is not None),
                candidates[0])


def kronecker_rotation(size: int, max_tp_size: int, seed: int, block_size: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """(R_m, R_n) for an input of `size`: R_m block-diagonal over the shards. block_size b > 0 (quarot's block_size):
    R_m = I and R_n of order b, i.e. a block-diagonal rotation in blocks of b consecutive channels, as the offline
    rotation of the residual then is (one MX block each with b = 32)."""
    if block_size > 0:
        if size % block_size:
            raise UnsupportedError(f"quarot online: block_size {block_size} does not divide down_proj's input size "
                                   f"{size}")
        return torch.eye(size // block_size), _rotation_blocks(block_size, 1, seed + 1, "Kronecker rotation (n)")
    m, n = kronecker_factors(size, max_tp_size)
    return (_rotation_blocks(m // max_tp_size, max_tp_size, seed, "Kronecker rotation (m)"),
            _rotation_blocks(n, 1, seed + 1, "Kronecker rotation (n)"))


def down_projections(structure: ModelStructure) -> list[str]:
    """The dense down projections of a block (relative names): the targets of its up-down smoothing subgraphs
    outside routed experts (whose per-expert down_proj the engines do not rotate)."""
    return [g.targets[0] for g in structure.smooth_subgraphs
            if g.kind == "up-down" and EVERY_EXPERT not in g.source]


@dataclass
class OnlineSites:
    """The linears to rotate online (full names), each with its rotation; the matrices of a kind and size are
    shared by every layer (one global rotation, as the established tool saves it)."""

    rotations: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def layers(self, kind: str) -> list[str]:
        return [name for name, rotation in self.rotations.items() if kind in rotation]

    def summary(self) -> str:
        """What the plan writes, for the log (and a dry run)."""
        shapes = sorted({" x ".join(str(m.shape[0]) for m in r.values()) for r in self.rotations.values()})
        return (f"{len(self.layers(HEADS_ROTATION))} o_proj heads rotation(s) and {len(self.layers(KRONECKER_M))} "
                f"down_proj Kronecker rotation(s) (orders {', '.join(shapes) or '-'}), saved float32 beside their "
                f"layers; vLLM-Ascend's released schemes do not apply them")

    def metadata(self, max_tp_size: int) -> dict:
        """The description's `metadata.quarot` (protocol.md §4.3)."""
        return {"max_tp_size": max_tp_size, "heads_rotation": {"layers": self.layers(HEADS_ROTATION)},
                "kronecker_rotation": {"layers": self.layers(KRONECKER_M)}}


def _layer_index(block_name: str) -> int | None:
    tail = block_name.rsplit(".", 1)[-1]
    return int(tail) if tail.isdigit() else None


def plan_online_sites(model: nn.Module, block_names: list[str], structure: ModelStructure,
                      head_outputs: dict[str, int], config: QuaRotConfig,
                      scheme_of: Callable[[str], object]) -> OnlineSites:
    """On the empty model: which linears rotate online and with what. head_outputs: {o_proj pattern (relative to a
    block): its number of heads}. Refuses (UnsupportedError) a layer index the model lacks, a listed layer without
    a dense down_proj, and shapes that do not split into max_tp_size shards, before any weight is read."""
    down_proj_layers, max_tp_size, seed = config.down_proj_online_layers, config.max_tp_size, config.seed
    layers = {_layer_index(b): b for b in block_names if structure.is_decoder_layer(b)}
    unknown = sorted(set(down_proj_layers) - layers.keys())
    if unknown:
        raise UnsupportedError(f"quarot: down_proj_online_layers names layer(s) {unknown}, but this model's decoder "
                               f"layers are {min(layers, default=0)}..{max(layers, default=-1)}")
    downs = down_projections(structure)
    sites = OnlineSites()
    heads_matrices: dict[int, torch.Tensor] = {}
    kronecker_matrices: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for index, block_name in layers.items():
        modules = dict(model.get_submodule(block_name).named_modules())
        for pattern, num_heads in head_outputs.items():
            for name in matching(modules, pattern):
                if scheme_of(f"{block_name}.{name}") is None:
                    continue
                if num_heads not in heads_matrices:
                    heads_matrices[num_heads] = heads_rotation(num_heads, max_tp_size, seed + 2)
                sites.rotations[f"{block_name}.{name}"] = {HEADS_ROTATION: heads_matrices[num_heads]}
        if index not in down_proj_layers:
            continue
        present = [d for d in downs if d in modules]
        if not present:
            raise UnsupportedError(f"quarot: down_proj_online_layers lists layer {index}, but {block_name} has no dense "
                                   f"down projection (the online Kronecker rotation of routed experts' down_proj is "
                                   f"not implemented); remove {index} from the list")
        for name in present:
            if scheme_of(f"{block_name}.{name}") is None:
                log.info("quarot: %s.%s stays float, so it is not rotated online", block_name, name)
                continue
            size = modules[name].in_features
            if size not in kronecker_matrices:
                kronecker_matrices[size] = kronecker_rotation(size, max_tp_size, seed + 3, config.block_size)
            m, n = kronecker_matrices[size]
            sites.rotations[f"{block_name}.{name}"] = {KRONECKER_M: m, KRONECKER_N: n}
    return sites
