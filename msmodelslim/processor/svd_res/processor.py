"""`svd_res`: SVDQuant's low-rank residual split (Li et al., "SVDQuant: Absorbing Outliers by Low-Rank Components
for 4-Bit Diffusion Models", ICLR 2025). The established recipe is iter_smooth -> svd_res -> linear_quant (MXFP4
W4A4): smoothing moves activation outliers into the weights, the rank-r SVD part absorbs the weights' largest
directions in high precision, and only the residual is quantized.

```yaml
- type: svd_res
  rank: 32            # > 0, at most min(out, in) of every selected layer
  include: ["*"]
  exclude: []
```

For each selected linear W [out, in] (as the steps before left it), with W = U S Vᵀ its SVD:

    l1 = Vᵣᵀ [r, in],  l2 = Uᵣ Sᵣ [out, r],  R = W − l2 l1,   y = x Rᵀ + (x l1ᵀ) l2ᵀ + b  (= x Wᵀ + b in float).

The split is the truncated SVD in float64 (the best rank-r approximation in Frobenius norm, Eckart–Young):
exact for small layers, by subspace iteration from a fixed start (32 extra columns, 8 power steps) for large
ones; the established tool uses `torch.svd_lowrank` (no extra columns, 2 steps), a coarser approximation of it.
Only linears that a later rule quantizes are split: a float layer gains nothing from it, and stays a plain
FLOAT layer every engine loads. No calibration data is needed, and no linear's input changes.
"""
from __future__ import annotations

import torch
from torch import nn

from msmodelslim.core.errors import ConfigError, ProcessingError
from msmodelslim.core.logging import get_logger
from msmodelslim.ir.lowrank import LowRankResidualLinear
from msmodelslim.ir.online_rotation import attach_rotation, input_rotation
from msmodelslim.processor.base import Processor, ProcessorContext, register_processor
from msmodelslim.processor.matching import select
from msmodelslim.processor.svd_res.config import SvdResConfig

log = get_logger("svd_res")


# Subspace iteration (Halko, Martinsson & Tropp, SIAM Review 2011) replaces the full SVD when the rank is small
# against the layer: a full SVD costs O(out·in·min(out, in)) (90 s for one 2048 x 5632 layer on two shared CPU
# cores, against 10 s for the iteration), the iteration O(out·in·k) per step. k = rank + OVERSAMPLE columns and POWER_STEPS steps make the found subspace the
# top-r one to well below float32 precision whenever the spectrum has a gap at r; without a gap any subspace of
# near-top directions is as good (its error is within a hair of the optimum: tests/test_svd_res.py measures it).
OVERSAMPLE = 32
POWER_STEPS = 8
EXACT_UP_TO = 4  # full SVD while min(out, in) <= EXACT_UP_TO·k (small layers, or a rank near the layer's)


def _top_singular(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Uᵣ, Sᵣ, Vᵣᵀ) of a float64 matrix: exact for small layers, else subspace iteration from a fixed start."""
    k = min(rank + OVERSAMPLE, min(w.shape))
    if min(w.shape) <= EXACT_UP_TO * k:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    start = torch.randn(w.shape[1], k, generator=torch.Generator().manual_seed(0), dtype=w.dtype)
    q = torch.linalg.qr(w @ start).Q  # [out, k], orthonormal; re-orthonormalised each half step for stability
    for _ in range(POWER_STEPS):
        q = torch.linalg.qr(w @ torch.linalg.qr(w.T @ q).Q).Q
    u_small, s, vh = torch.linalg.svd(q.T @ w, full_matrices=False)  # [k, in]: W ≈ Q·(QᵀW)
    return (q @ u_small)[:, :rank], s[:rank], vh[:rank]


@torch.no_grad()
def svd_split(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(R, l1, l2), float32 on the weight's device: l1 = Vᵣᵀ [r, in], l2 = Uᵣ·Sᵣ [out, r], R = W − l2·l1 [out, in].

    Computed in float64 on the CPU and rounded to float32 once: LAPACK's float32 results move in their last bits
    with the thread count, which would make dp_layer_wise ranks (fewer threads each) write other bytes than one
    process; in float64 such differences are far below float32's rounding. R is formed in float64 from the
    rounded pair, so W = R + l2·l1 up to R's own float32 rounding."""
    w = weight.detach().to("cpu", torch.float64)
    if not 0 < rank <= min(w.shape):
        raise ValueError(f"rank {rank} is outside 1..min(out, in) = {min(w.shape)} for a {list(w.shape)} weight")
    u, s, vh = _top_singular(w, rank)
    l1 = vh.float().contiguous()
    l2 = (u * s).float().contiguous()
    residual = (w - l2.double() @ l1.double()).float()
    return tuple(t.to(weight.device) for t in (residual, l1, l2))


def rank_refusal(name: str, out_features: int, in_features: int, rank: int) -> str | None:
    limit = min(out_features, in_features)
    if rank <= limit:
        return None
    return (f"svd_res rank {rank} exceeds min(out, in) = {limit} of layer {name} [{out_features}, {in_features}]: "
            f"a rank-{rank} part of it does not exist. Set rank <= {limit}, or exclude the layer")


@register_processor("svd_res")
class SvdResProcessor(Processor):
    def __init__(self, config: SvdResConfig, context: ProcessorContext = ProcessorContext()) -> None:
        self.config = config
        self.context = context

    @property
    def needs_calibration(self) -> bool:
        return False

    def claims(self, linear_names: list[str]) -> dict[str, str]:
        return {}  # the later quantization rule decides the layer's type; the plan marks it _SVD

    def _split_here(self, names: list[str]) -> list[str]:
        """The selected linears that a later rule quantizes (the others stay float, unsplit)."""
        return [n for n in select(names, self.config.include, self.config.exclude)
                if self.context.scheme_of(n) is not None]

    def check_model(self, model: nn.Module, block_names: list[str]) -> None:
        """On the empty model: every layer to split has a rank-r part (r <= min(out, in))."""
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
                 and any(n.startswith(b + ".") for b in block_names)]
        targets = self._split_here(names)
        if not targets:
            log.warning("svd_res (include=%s, exclude=%s) selects no linear that a later step quantizes: it changes "
                        "nothing", self.config.include, self.config.exclude)
        for name in targets:
            module = model.get_submodule(name)
            reason = rank_refusal(name, module.out_features, module.in_features, self.config.rank)
            if reason:
                raise ConfigError(reason)

    def after_forward(self, block_name: str, block: nn.Module) -> None:
        names = [f"{block_name}.{n}" for n, m in block.named_modules() if isinstance(m, nn.Linear)]
        for name in self._split_here(names):
            relative = name[len(block_name) + 1 :]
            linear = block.get_submodule(relative)
            if isinstance(linear, LowRankResidualLinear):
                raise ProcessingError(f"{name} was already split by an earlier svd_res step; select each layer in "
                                      f"one svd_res step only")
            reason = rank_refusal(name, linear.out_features, linear.in_features, self.config.rank)
            if reason:
                raise ProcessingError(reason)
            residual, l1, l2 = svd_split(linear.weight, self.config.rank)
            bias = None if linear.bias is None else linear.bias.detach()
            split = LowRankResidualLinear(residual, bias, l1, l2)
            rotation = input_rotation(linear)
            if rotation:  # behind quarot's online rotation: the split is of W·Tᵀ and reads T·x too
                attach_rotation(split, rotation, rotate_weight=False)
            parent_name, _, child = relative.rpartition(".")
            setattr(block.get_submodule(parent_name) if parent_name else block, child, split)
            log.debug("%s: rank-%d part kept in float, |R|/|W| = %.4f", name, self.config.rank,
                      float(residual.norm() / linear.weight.detach().float().norm().clamp(min=1e-30)))

    def input_scaling(self, block_name: str, block: nn.Module) -> dict[str, torch.Tensor]:
        return {}  # no linear's input changes: carried activation ranges stay valid
