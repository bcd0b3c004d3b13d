"""GPTQ: Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers",
ICLR 2023.

Quantize the columns of W one at a time; after each, spread its rounding error over the columns not yet
quantized so that the layer's output on the calibration inputs moves as little as possible. With
H = 2·X·Xᵀ/n (X the layer inputs) and U the upper Cholesky factor of H⁻¹:

    e      = (w_j − Q(w_j)) / U[j, j]
    W[:, k] −= e · U[j, k]          for every later column k

Columns are processed in blocks (the updates to later blocks are applied in one matmul). Options: damping
(percdamp·mean(diag H) added to the diagonal), act_order (process columns by decreasing diag H; group ranges
are then fixed from the original weights so the saved layout stays plain groups).
"""
from __future__ import annotations

import torch

from msmodelslim.quantizer.primitives import int_range, scale_offset_from_minmax


def _params(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return scale_offset_from_minmax(w.amin(dim=1), w.amax(dim=1), bits, symmetric)


def accumulate_hessian(h: torch.Tensor | None, count: int, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Running H = 2·X·Xᵀ/n over all tokens seen; x is [..., in]."""
    x = x.reshape(-1, x.shape[-1]).double()
    n = x.shape[0]
    h = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device) if h is None else h
    h = h * (count / (count + n)) + (2.0 / (count + n)) * (x.T @ x)
    return h, count + n


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    symmetric: bool,
    group_size: int | None = None,
    block_size: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes int8 [out, in], scale [out, n_groups], offset [out, n_groups]) in the layout of
    `quantize_weight_minmax`."""
    w = weight.detach().float().clone()
    out_features, cols = w.shape
    h = hessian.double().to(w.device).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    group = group_size or cols
    n_groups = cols // group
    qmin, qmax = int_range(bits)
    scale = torch.zeros(out_features, n_groups, device=w.device)
    offset = torch.zeros(out_features, n_groups, device=w.device)
    if act_order or group_size is None:  # fixed ranges from the original weights
        for g in range(n_groups):
            scale[:, g], offset[:, g] = _params(w[:, g * group:(g + 1) * group], bits, symmetric)
    perm = torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(cols, device=w.device)
    w, h = w[:, perm], h[perm][:, perm]
    h += percdamp * torch.diagonal(h).mean() * torch.eye(cols, dtype=h.dtype, device=h.device)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    if group_size and not act_order:  # a group must not straddle two blocks: its range is taken at its start
        block_size = group * max(1, block_size // group)
    codes = torch.zeros(out_features, cols, dtype=torch.int8, device=w.device)
    order = perm.tolist()
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        block, errors = w[:, start:end].clone(), torch.zeros(out_features, end - start, device=w.device)
        for i in range(end - start):
            column = order[start + i]
            g = column // group
            if group_size and not act_order and column % group == 0:
                scale[:, g], offset[:, g] = _params(block[:, i:i + group], bits, symmetric)
            s, o = scale[:, g], offset[:, g]
            q = (torch.round(block[:, i] / s) + o).clamp(qmin, qmax)
            codes[:, column] = q.to(torch.int8)
            err = (block[:, i] - (q - o) * s) / u[start + i, start + i]
            block[:, i:] -= err.unsqueeze(1) * u[start + i, start + i:end].unsqueeze(0)
            errors[:, i] = err
        w[:, end:] -= errors @ u[start:end, end:]
    return codes, scale, offset
