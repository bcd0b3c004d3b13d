"""Checker items for QuaRot's online rotations (protocol.md §4.3-4.4): `<p>.heads_rotation` or
`<p>.kronecker_rotation_m` + `<p>.kronecker_rotation_n` beside a quantized layer, written without a description
entry, and the layer lists in the description's `metadata.quarot`."""
from __future__ import annotations

import torch

from msmodelslim.format.findings import Finding
from msmodelslim.ir.online_rotation import HEADS_ROTATION, KRONECKER_M, ROTATION_TENSORS, check_rotation

NOT_LOADED = ("vLLM-Ascend's released schemes do not load heads_rotation / kronecker_rotation_m/n (formats.md A.3), "
              "so it would serve these layers without their rotation; serve with an engine that applies them "
              "(msmodelslim eval and our reader do)")


def rotation_tensor_names(tensors: dict[str, torch.Tensor]) -> set[str]:
    return {name for name in tensors if name.rpartition(".")[2] in ROTATION_TENSORS}


def check_online_rotations(description: dict, tensors: dict[str, torch.Tensor],
                           in_features: dict[str, int | None]) -> list[Finding]:
    """in_features: {quantized layer prefix: its input size, None when its tensors do not say}."""
    findings: list[Finding] = []
    err = lambda m: findings.append(Finding("error", m))
    by_layer: dict[str, dict[str, torch.Tensor]] = {}
    for name in sorted(rotation_tensor_names(tensors)):
        prefix, _, suffix = name.rpartition(".")
        if prefix not in in_features:
            err(f"{name}: an online rotation of {prefix}, which is not a quantized layer of the description")
            continue
        by_layer.setdefault(prefix, {})[suffix] = tensors[name]
    for prefix, rotation in by_layer.items():
        if in_features[prefix] is None:  # the layer's own tensors are malformed, which its checks report
            continue
        try:
            check_rotation({k: v.float() for k, v in rotation.items()}, in_features[prefix])
        except ValueError as exc:
            err(f"{prefix}: {exc}")
    metadata = description.get("metadata") if isinstance(description.get("metadata"), dict) else {}
    quarot = metadata.get("quarot") or {}
    for key, suffix in (("heads_rotation", HEADS_ROTATION), ("kronecker_rotation", KRONECKER_M)):
        listed = set(((quarot.get(key) or {}).get("layers")) or [])
        present = {p for p, r in by_layer.items() if suffix in r}
        if listed != present:
            err(f"description metadata.quarot.{key}.layers lists {len(listed)} layer(s), but {len(present)} carry "
                f"{suffix} (e.g. {sorted(listed ^ present)[0]} differs)")
    if by_layer:
        findings.append(Finding("warning", f"{len(by_layer)} quantized layer(s) rotate their input online "
                                           f"(e.g. {next(iter(by_layer))}): {NOT_LOADED}"))
    return findings
