"""Integrity of written checkpoints, any format.

Every writer's last check before its output is moved into place: the files on disk hold every tensor the
model needs. The expectation comes from the model's structure (the input checkpoint's tensors as the model
loads them, quantized linears replaced by their quantized tensors), the evidence from the written safetensors
headers alone, so a writer that silently dropped a tensor cannot pass its own check.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors import safe_open
from torch import nn

from msmodelslim.core.errors import FormatCheckError
from msmodelslim.format.ascendv1.tensors import decode_deq_scale
from msmodelslim.ir.quant_linear import QuantLinear
from msmodelslim.quantizer.primitives import all_finite

# A quantized linear is present when one of these holds its codes (int8 / int4-in-int8 / packed int32).
QUANTIZED_WEIGHT = ("weight", "weight_packed")


def required_tensors(model: nn.Module, quantized: Iterable[str], tied_aliases: bool) -> list[tuple[str, ...]]:
    """One tuple of acceptable names per tensor the output must hold.

    `quantized`: linears planned as quantized (on a float skeleton); QuantLinear modules count as quantized too.
    `tied_aliases`: whether the format stores a tied table (lm_head sharing the embedding) under both names.
    """
    quantized = set(quantized)
    required: list[tuple[str, ...]] = []
    seen: set[int] = set()
    skip_under: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in skip_under):
            continue
        if name in quantized or isinstance(module, QuantLinear):
            skip_under.append(name)
            required.append(tuple(f"{name}.{s}" for s in QUANTIZED_WEIGHT))
            if getattr(module, "bias", None) is not None:
                required.append((f"{name}.bias",))
            continue
        own = list(module.named_parameters(recurse=False)) + [
            (b, t) for b, t in module.named_buffers(recurse=False)
            if t is not None and b not in module._non_persistent_buffers_set
        ]
        for local, tensor in own:
            alias = id(tensor) in seen  # tied parameters are one object under two names
            seen.add(id(tensor))
            if alias and not tied_aliases:
                continue
            required.append((f"{name}.{local}" if name else local,))
    return required


def written_tensor_names(out_dir: Path) -> set[str]:
    """Tensor names in the safetensors files of `out_dir` (top level), read from the headers only."""
    names: set[str] = set()
    for shard in sorted(out_dir.glob("*.safetensors")):
        with open(shard, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(length))
        names.update(k for k in header if k != "__metadata__")
    return names


def verify_complete(out_dir: Path, required: list[tuple[str, ...]]) -> None:
    """Raise FormatCheckError naming the tensors the written output lacks."""
    present = written_tensor_names(out_dir)
    missing = [alternatives[0] for alternatives in required if not any(n in present for n in alternatives)]
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise FormatCheckError(
            f"the written checkpoint lacks {len(missing)} tensor(s) the model needs ({shown}); it was not moved "
            f"into place. This is a bug in msmodelslim: please report it with MSMODELSLIM_LOG_LEVEL=debug output"
        )


def _non_finite(name: str, tensor: torch.Tensor) -> bool:
    return not all_finite(decode_deq_scale(tensor) if name.endswith(".deq_scale") else tensor)


def read_checked_tensors(path: Path, err: Callable[[str], None], keep: bool = True) -> dict[str, torch.Tensor | None]:
    """{name: tensor} of the top-level *.safetensors files (values None unless `keep`: only one tensor is held
    at a time then). Unreadable files, names in two files and NaN/Inf values (in float tensors, and in
    deq_scale's int64-encoded floats) are reported through `err`."""
    tensors: dict[str, torch.Tensor | None] = {}
    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    if key in tensors:
                        err(f"tensor {key} appears in two files")
                    tensor = f.get_tensor(key)
                    if _non_finite(key, tensor):
                        err(f"{key} holds NaN or Inf values")
                    tensors[key] = tensor if keep else None
        except Exception as exc:  # truncated, garbage or foreign: the loader would fail the same way
            err(f"{file.name} is not a readable safetensors file ({type(exc).__name__}: {exc})")
    return tensors
