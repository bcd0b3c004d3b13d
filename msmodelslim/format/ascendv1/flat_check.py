"""Checker items for FlatQuant's transform (formats.md A.4.8): `left_trans`, `right_trans` and `clip_ratio` beside a
layer of type `<inner>_FLATQUANT[_DYNAMIC]`, shaped as vLLM-Ascend's loader derives them, and one transform per
fused layer."""
from __future__ import annotations

import torch

from msmodelslim.format.ascendv1.tensors import FLOAT_WEIGHT_DTYPES
from msmodelslim.format.findings import Finding
from msmodelslim.ir.flat_transform import (CLIP_RATIO, FLAT_TENSORS, LEFT_TRANS, RIGHT_TRANS, FlatDims,
                                           check_flat_transform, flat_dims, is_block_diagonal)


def _row_parallel_dims(shape: tuple[int, int], in_features: int) -> FlatDims | None:
    """The row-parallel MXFP4 transform shape when (left, right) `shape` can only be it; None otherwise (where the
    column and row pairs coincide, the layer's name decides, which the checker does not know)."""
    dims = {}
    for row_parallel in (False, True):
        try:
            dims[row_parallel] = flat_dims(in_features, mxfp4=True, row_parallel=row_parallel)
        except ValueError:
            pass
    pairs = {kind: (d.left, d.right) for kind, d in dims.items()}
    return dims[True] if pairs.get(True) == shape and pairs.get(False) != shape else None


def check_flat_transform_tensors(prefix: str, tag: str, t: dict[str, torch.Tensor], in_features: int | None,
                                 mxfp4: bool) -> list[Finding]:
    """FlatQuant's tensors (formats.md A.4.8): left_trans [a, a] and right_trans [b, b] float with (a, b) a factor
    pair of K that vLLM-Ascend's loader derives (ir/flat_transform.flat_dims), invertible; clip_ratio float32
    [1] in (0, 1] (the kernel takes it as the ratio itself). MXFP4 with the row-parallel pair: left_trans
    block-diagonal over max_supported_tp ranks (each keeps its own block)."""
    missing = [s for s in FLAT_TENSORS if s not in t]
    if missing:
        return [Finding("error", f"{prefix}: {tag} needs tensor(s) {', '.join(map(repr, missing))}")]
    f = [Finding("error", f"{prefix}: '{s}' must be a float tensor, got {t[s].dtype}")
         for s in (LEFT_TRANS, RIGHT_TRANS) if t[s].dtype not in FLOAT_WEIGHT_DTYPES]
    if t[CLIP_RATIO].dtype != torch.float32:
        f.append(Finding("error", f"{prefix}: '{CLIP_RATIO}' is {t[CLIP_RATIO].dtype}, expected torch.float32"))
    if f or in_features is None:
        return f
    try:
        check_flat_transform({name: t[name].float() for name in FLAT_TENSORS}, in_features, mxfp4)
    except ValueError as exc:
        f.append(Finding("error", f"{prefix}: {exc}"))
        return f
    shape = (t[LEFT_TRANS].shape[0], t[RIGHT_TRANS].shape[0])
    row = _row_parallel_dims(shape, in_features) if mxfp4 else None
    if row is not None and not is_block_diagonal(t[LEFT_TRANS], row.left_blocks):
        f.append(Finding("error", f"{prefix}: '{LEFT_TRANS}' has the row-parallel shape but is not block-diagonal "
                                  f"over {row.left_blocks} ranks (max_supported_tp); each rank keeps only its "
                                  f"diagonal block"))
    return f


def check_fused_flat_transforms(members: list[str], tensors: dict[str, torch.Tensor]) -> list[Finding]:
    """The engine keeps one transform for a fused layer (q/k/v, gate/up): its members must carry equal ones."""
    findings = []
    for name in FLAT_TENSORS:
        shared = [tensors.get(f"{m}.{name}") for m in members]
        if all(s is not None for s in shared) and not all(torch.equal(shared[0], s) for s in shared[1:]):
            findings.append(Finding("error", f"fused layers {members} have different {name}; the engine keeps one "
                                             f"for all of them"))
    return findings
