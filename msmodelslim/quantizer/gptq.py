"""GPTQ: Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers",
ICLR 2023.

Quantize the columns of W one at a time; after each, spread its rounding error over the columns not yet
quantized so that the layer's output on the calibration inputs moves as little as possible. With
H = 2·X·Xᵀ/n (X the layer inputs) and U the upper Cholesky factor of H⁻¹:

    e      = (w_j − Q(w_j)) / U[j, j]
    W[:, k] −= e · U[j, k]          for every later column k

Columns are processed in blocks (the updates to later blocks are applied in one matmul). Options: damping
(percdamp·mean(diag H) added to the diagonal), act_order (process columns by decreasing diag H; group ranges
are then fixed from the original weights so the saved layout stays plain groups), clip_search (integer grids:
each range shrunk by the grid search of quantizer/clip_search.py instead of min/max).

The grid a column is rounded to is a parameter (`IntGrid`, `FloatGrid`): the error fed back is always the one
of the quantizer the layer will really get. A group's parameters are fitted when its first column is reached,
from the weights as the earlier columns' feedback left them (GPTQ's grouping); for FP8 per channel (one group)
and under act_order they are fitted once from the original weights.
"""
from __future__ import annotations

from typing import Protocol

import torch

from msmodelslim.quantizer.float_formats import (ELEMENTS, FP8_E4M3_MAX, MX_BLOCK, MX_ELEMENT, encode_fp4_e2m1,
                                                 fp8_scale, power_of_two, round_fp4_e2m1)
from msmodelslim.quantizer.clip_search import clip_search_range
from msmodelslim.quantizer.mx_methods import mse_round_exponent
from msmodelslim.quantizer import nvfp4
from msmodelslim.quantizer.primitives import int_range, scale_offset_from_minmax


def accumulate_hessian(h: torch.Tensor | None, count: int, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Running H = 2·X·Xᵀ/n over all tokens seen; x is [..., in]."""
    x = x.reshape(-1, x.shape[-1]).double()
    n = x.shape[0]
    h = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device) if h is None else h
    h = h * (count / (count + n)) + (2.0 / (count + n)) * (x.T @ x)
    return h, count + n


class ColumnGrid(Protocol):
    group: int  # columns per group (all columns: one group)

    def fit(self, g: int, columns: torch.Tensor) -> None:
        """Set group g's parameters from its columns [out, group]."""

    def round(self, column: torch.Tensor, index: int, g: int) -> torch.Tensor:
        """Quantize column `index` (of group g), keep its code, return its dequantized value."""

    def result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes, scale [out, n_groups], offset [out, n_groups])."""


class IntGrid:
    """Uniform integer grid, min/max range per row and group (asymmetric with an offset); with `clip_search`
    the range shrunk by a grid search (quantizer/clip_search.py)."""

    def __init__(self, out: int, cols: int, bits: int, symmetric: bool, group: int | None, device,
                 clip_search: bool = False) -> None:
        self.bits, self.symmetric, self.group, self.clip_search = bits, symmetric, group or cols, clip_search
        self.qmin, self.qmax = int_range(bits)
        n_groups = cols // self.group
        self.scale = torch.zeros(out, n_groups, device=device)
        self.offset = torch.zeros(out, n_groups, device=device)
        self.codes = torch.zeros(out, cols, dtype=torch.int8, device=device)

    def fit(self, g: int, columns: torch.Tensor) -> None:
        if self.clip_search:
            self.scale[:, g], self.offset[:, g] = clip_search_range(columns, self.bits, self.symmetric)
            return
        self.scale[:, g], self.offset[:, g] = scale_offset_from_minmax(columns.amin(dim=1), columns.amax(dim=1),
                                                                       self.bits, self.symmetric)

    def round(self, column: torch.Tensor, index: int, g: int) -> torch.Tensor:
        s, o = self.scale[:, g], self.offset[:, g]
        q = (torch.round(column / s) + o).clamp(self.qmin, self.qmax)
        self.codes[:, index] = q.to(torch.int8)
        return (q - o) * s

    def result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.codes, self.scale, self.offset


class FloatGrid:
    """fp8_e4m3 per channel (scale max|w|/448 of the row) or MX (mxfp8 / mxfp4: per block of 32 columns a
    power-of-two scale whose exponent is the OCP one or one larger, whichever gives the block's columns the
    smaller squared error: quantizer/mx_methods.py mse_round_exponent). Elements round to nearest-even."""

    def __init__(self, out: int, cols: int, dtype: str, device) -> None:
        self.dtype = dtype
        self.element = MX_ELEMENT.get(dtype, "fp8_e4m3")
        self.round_element = ELEMENTS[self.element][0]
        self.group = MX_BLOCK if dtype in MX_ELEMENT else cols
        self.scale = torch.zeros(out, cols // self.group, device=device)
        self.values = torch.zeros(out, cols, device=device)

    def fit(self, g: int, columns: torch.Tensor) -> None:
        if self.dtype in MX_ELEMENT:
            self.scale[:, g] = power_of_two(mse_round_exponent(columns, self.element)).reshape(-1)
        else:
            self.scale[:, g] = fp8_scale(columns.abs().amax(dim=1))

    def round(self, column: torch.Tensor, index: int, g: int) -> torch.Tensor:
        s = self.scale[:, g]
        v = self.round_element(column / s)
        self.values[:, index] = v
        return v * s

    def result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        values = self.values.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)
        codes = encode_fp4_e2m1(values) if self.dtype == "mxfp4" else values.to(torch.float8_e4m3fn)
        return codes, self.scale, torch.zeros_like(self.scale)


class NVFP4Grid:
    """NVFP4 (quantizer/nvfp4.py): the global scale g fixed from the original weight (or its fused group), each
    block of 16 columns' FP8 scale e4m3(g · max|w| / 6) fitted when its first column is reached."""

    def __init__(self, out: int, cols: int, g: torch.Tensor, device) -> None:
        self.group = nvfp4.NVFP4_BLOCK
        self.g = g.to(device)
        self.scale = torch.zeros(out, cols // self.group, device=device)
        self.values = torch.zeros(out, cols, device=device)

    def fit(self, g: int, columns: torch.Tensor) -> None:
        self.scale[:, g] = nvfp4.block_scales(columns, self.g).reshape(-1)

    def round(self, column: torch.Tensor, index: int, g: int) -> torch.Tensor:
        s = nvfp4.effective_scale(self.scale[:, g], self.g)
        v = round_fp4_e2m1(column / s)
        self.values[:, index] = v
        return v * s

    def result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return encode_fp4_e2m1(self.values), self.scale, self.g


@torch.no_grad()
def gptq_on_grid(weight: torch.Tensor, hessian: torch.Tensor, grid: ColumnGrid, block_size: int = 128,
                 percdamp: float = 0.01, act_order: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ with `grid` as the quantizer; returns grid.result()."""
    w = weight.detach().float().clone()
    out_features, cols = w.shape
    h = hessian.double().to(w.device).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    group = grid.group
    fixed_ranges = act_order or group == cols
    if fixed_ranges:  # from the original weights
        for g in range(cols // group):
            grid.fit(g, w[:, g * group:(g + 1) * group])
    perm = torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(cols, device=w.device)
    w, h = w[:, perm], h[perm][:, perm]
    h += percdamp * torch.diagonal(h).mean() * torch.eye(cols, dtype=h.dtype, device=h.device)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    if not fixed_ranges:  # a group must not straddle two blocks: its range is taken at its start
        block_size = group * max(1, block_size // group)
    order = perm.tolist()
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        block, errors = w[:, start:end].clone(), torch.zeros(out_features, end - start, device=w.device)
        for i in range(end - start):
            column = order[start + i]
            g = column // group
            if not fixed_ranges and column % group == 0:
                grid.fit(g, block[:, i:i + group])
            err = (block[:, i] - grid.round(block[:, i], column, g)) / u[start + i, start + i]
            block[:, i:] -= err.unsqueeze(1) * u[start + i, start + i:end].unsqueeze(0)
            errors[:, i] = err
        w[:, end:] -= errors @ u[start:end, end:]
    return grid.result()


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int, symmetric: bool,
                  group_size: int | None = None, block_size: int = 128, percdamp: float = 0.01,
                  act_order: bool = False, clip_search: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer GPTQ: (codes int8 [out, in], scale [out, n_groups], offset [out, n_groups]) in the layout of
    `quantize_weight_minmax`."""
    grid = IntGrid(*weight.shape, bits, symmetric, group_size, weight.device, clip_search)
    return gptq_on_grid(weight, hessian, grid, block_size, percdamp, act_order)


def gptq_quantize_float(weight: torch.Tensor, hessian: torch.Tensor, dtype: str, block_size: int = 128,
                        percdamp: float = 0.01, act_order: bool = False):
    """GPTQ on the fp8_e4m3 / mxfp8 / mxfp4 grid: (codes, scale, zero offset) as `quantize_weight_float`."""
    return gptq_on_grid(weight, hessian, FloatGrid(*weight.shape, dtype, weight.device), block_size, percdamp,
                        act_order)


def gptq_quantize_nvfp4(weight: torch.Tensor, hessian: torch.Tensor, amax=None, block_size: int = 128,
                        percdamp: float = 0.01, act_order: bool = False):
    """GPTQ on the NVFP4 grid: (codes uint8, block scales float32 (E4M3 values), global scale [1]) as
    `nvfp4.quantize_weight_nvfp4`; `amax` is the max|W| of the fused group the global scale comes from."""
    g = nvfp4.global_scale(weight.detach().float().abs().max() if amax is None else amax)
    return gptq_on_grid(weight, hessian, NVFP4Grid(*weight.shape, g, weight.device), block_size, percdamp, act_order)
