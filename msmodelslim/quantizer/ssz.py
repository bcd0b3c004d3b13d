"""SSZ: search of each group's scale and offset (zero point) that minimise the weight reconstruction error
‖W − Ŵ‖², as the established tool's `ssz` method does (its iteration count is `ext.step`).

Two stages. (1) Range search: shrink the min/max range by each ratio r in SHRINK (0.30 … 1.00) and keep,
per group, the ratio with the lowest error (the error is not convex in the range, so a grid finds the basin).
(2) Alternating least squares from there: with the codes q fixed, the best affine map is a linear regression
of w on q (w ≈ s·q + b, offset = −b/s; symmetric: s = Σw·q / Σq², b = 0); with (s, offset) fixed, the best
codes are round-to-nearest. The best parameters seen per group are kept, so the result is never worse than
min/max (r = 1 is on the grid).
"""
from __future__ import annotations

import torch

from msmodelslim.quantizer.clip_search import best_shrunk_range
from msmodelslim.quantizer.primitives import int_range, to_groups

SHRINK = [round(0.30 + 0.02 * i, 2) for i in range(36)]  # 0.30 … 1.00


@torch.no_grad()
def ssz_quantize(w: torch.Tensor, bits: int, symmetric: bool, group_size: int | None = None,
                 steps: int = 50) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes int8 [out, in], scale [out, n_groups], offset [out, n_groups]), the layout of
    `quantize_weight_minmax`."""
    groups = to_groups(w.detach().float(), group_size)  # [out, G, size]
    qmin, qmax = int_range(bits)
    tiny = torch.finfo(torch.float32).tiny

    def codes_and_error(s: torch.Tensor, o: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = (torch.round(groups / s.unsqueeze(-1)) + o.unsqueeze(-1)).clamp(qmin, qmax)
        return q, ((q - o.unsqueeze(-1)) * s.unsqueeze(-1) - groups).pow(2).sum(-1)

    # min/max (r = 1) first, so that it wins ties; then the shrunk ranges
    best_scale, best_offset = best_shrunk_range(groups, [1.0, *(r for r in SHRINK if r != 1.0)], bits, symmetric,
                                                norm=2)
    q, best_error = codes_and_error(best_scale, best_offset)
    scale, offset = best_scale.clone(), best_offset.clone()
    for _ in range(steps):
        if symmetric:
            s = (groups * q).sum(-1) / q.pow(2).sum(-1).clamp(min=1)
            o = torch.zeros_like(s)
        else:
            qm, wm = q.mean(-1), groups.mean(-1)
            var = (q.pow(2).mean(-1) - qm.pow(2))
            s = ((groups * q).mean(-1) - qm * wm) / var.clamp(min=1e-12)
            b = wm - s * qm
            s = torch.where(var > 0, s, scale)  # a constant group keeps its min/max fit
            o = torch.where(var > 0, torch.round(-b / s.clamp(min=tiny)), offset).clamp(qmin, qmax)
        s = s.clamp(min=tiny)
        q, error = codes_and_error(s, o)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scale = torch.where(better, s, best_scale)
        best_offset = torch.where(better, o, best_offset)
    q, _ = codes_and_error(best_scale, best_offset)
    return q.to(torch.int8).reshape(w.shape), best_scale, best_offset
