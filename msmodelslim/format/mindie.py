"""MindIE(-SD) format (`mindie_format_saver`, protocol.md §4.8), the layout MindIE-SD loads a quantized DiT from.

Files: `quant_model_description_<type>.json` and `quant_model_weight_<type>.safetensors` (singular "weight"),
<type> the lower-cased quantization type (e.g. w8a8_dynamic); without a quantized layer the names carry no
suffix. With part_file_size > 0: `quant_model_weight_<type>-0000k-of-0000N.safetensors` and
`quant_model_weight_<type>.safetensors.index.json`. The description maps every tensor to its type tag, as
ascendv1's does, plus `model_quant_type` (the type of the last quantized layer written: the established writer's
last-write-wins); it has no `version` or `group_size` keys. The config/`*.py` files of the source are copied.

Tensors per type are ascendv1's (format/ascendv1/tensors.py), except that W8A8's `deq_scale` is always float32.
This version writes the types protocol.md §4.8 lists for MindIE-SD: W8A8 (static) and W8A8_DYNAMIC per channel,
W8A8_MXFP8, W4A4_MXFP4 and W4A4_MXFP4_DUALSCALE (MX blocks of 32), FA3 (`<attn>.fa_{q,k,v}.scale/offset` tagged
FAQuant with `fa_quant_type: FAKQuant` for static per-head scales, and the per-attention `<attn>.quant_type`
strings) and online-rotation matrices (FLOAT). Every other type (W8A16, per-group, W4A8_MXFP, WFP8, W4A4/W4A8
int4, ...) is refused before any weight is read, in favour of ascendv1_saver.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from msmodelslim.core.errors import UnsupportedError
from msmodelslim.format.ascendv1.fa3 import FA_QUANT, GLOBAL as FA_GLOBAL, fa3_tensors
from msmodelslim.format.ascendv1.tensors import FLOAT, linear_tensors
from msmodelslim.format.ascendv1.writer import DescribedTensors
from msmodelslim.format.edits import OutputEdits
from msmodelslim.format.hf_files import own_tensors, quantized_and_float_modules
from msmodelslim.ir.fa3 import FA3HeadQuant
from msmodelslim.ir.quant_linear import MX_SCHEMES, QuantLinear
from msmodelslim.quantizer.scheme import Scheme

WEIGHTS = "quant_model_weight"
DESCRIPTION = "quant_model_description"
SUPPORTED = (Scheme.W8A8, Scheme.W8A8_DYNAMIC, Scheme.W8A8_MXFP8, Scheme.W4A4_MXFP4, Scheme.W4A4_MXFP4_DUALSCALE)
SUPPORTED_NAMES = "W8A8, W8A8_DYNAMIC per channel, W8A8_MXFP8, W4A4_MXFP4 and W4A4_MXFP4_DUALSCALE"
COPIED_SUFFIXES = (".json", ".py")


def refuse_unsupported_schemes(rules: Iterable) -> None:
    """Called while planning: every linear_quant rule's scheme must have a MindIE layout here."""
    for rule in rules:
        q = rule.qconfig
        if q.scheme not in SUPPORTED or q.weight.group_size is not None:
            what = f"{q.scheme.value}{' per-group' if q.weight.group_size is not None else ''}"
            raise UnsupportedError(f"mindie_format_saver does not write {what} in this version (it writes "
                                   f"{SUPPORTED_NAMES}); save it with ascendv1_saver")


def file_names(model_quant_type: str | None) -> tuple[str, str]:
    """(description file, weight file stem) for the recorded type."""
    suffix = f"_{model_quant_type.lower()}" if model_quant_type else ""
    return f"{DESCRIPTION}{suffix}.json", f"{WEIGHTS}{suffix}"


class MindIEWriter(DescribedTensors):
    def __init__(self, out_dir: Path, part_file_size_gb: float, dtype_for: Callable[[str], torch.dtype]) -> None:
        super().__init__(out_dir, part_file_size_gb, dtype_for)
        self.model_quant_type: str | None = None

    def add_module_tree(self, prefix: str, root: nn.Module) -> None:
        for name, module in quantized_and_float_modules(prefix, root):
            if isinstance(module, QuantLinear):
                per_group = module.group_size is not None and module.scheme not in MX_SCHEMES
                if module.scheme not in SUPPORTED or per_group:  # planning refuses these
                    raise UnsupportedError(f"{name}: mindie_format_saver does not write {module.scheme.value}")
                # bfloat16 selects the float32 deq_scale, which MindIE-SD reads whatever the model's dtype
                for suffix, (tensor, tag) in linear_tensors(module, torch.bfloat16, False).items():
                    self.add(f"{name}.{suffix}", tensor, tag)
                self.model_quant_type = module.scheme.value
                continue
            if isinstance(module, FA3HeadQuant):  # static per-head Q/K/V scales of the FA3 kernel
                for tensor_name, tensor in fa3_tensors(name, module).items():
                    self.add(tensor_name, tensor, FA_QUANT)
                continue
            for tensor_name, tensor in own_tensors(name, module):
                self.add_float(tensor_name, tensor)

    def finish(self, source_dir: Path, edits: OutputEdits | None = None) -> dict:
        """`edits.description`: entries naming no tensor (FA3's `<attn>.quant_type`)."""
        description_file, stem = file_names(self.model_quant_type)
        if self.shards.limit == 0:
            self.shards.finish(lambda i, n: f"{stem}.safetensors", None)
        else:
            self.shards.finish(lambda i, n: f"{stem}-{i:05d}-of-{n:05d}.safetensors", f"{stem}.safetensors.index.json")
        description = {**self.description, "model_quant_type": self.model_quant_type or FLOAT}
        if FA_QUANT in self.description.values():
            description.update(FA_GLOBAL)
        description.update((edits or OutputEdits()).description)
        (self.out_dir / description_file).write_text(json.dumps(description, indent=4), encoding="utf-8")
        for path in sorted(source_dir.iterdir()):
            if path.is_file() and path.name.endswith(COPIED_SUFFIXES) and not path.name.endswith("index.json"):
                shutil.copyfile(path, self.out_dir / path.name)
        return description
