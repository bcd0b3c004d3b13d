"""MindIE(-SD) format (`mindie_format_saver`, protocol.md §4.8): the layout MindIE-SD loads a quantized DiT from,
also written for text and vision-language models (modelslim_v1, multimodal_vlm_modelslim_v1).

Files: `quant_model_description_<type>.json` and `quant_model_weight_<type>.safetensors` (singular "weight"),
<type> the lower-cased quantization type (e.g. w8a8_dynamic); without a quantized layer the names carry no
suffix. With part_file_size > 0: `quant_model_weight_<type>-0000k-of-0000N.safetensors` and
`quant_model_weight_<type>.safetensors.index.json`. The description maps every tensor to its type tag, as
ascendv1's does, plus `model_quant_type` (the type of the last quantized layer written: the established writer's
last-write-wins); it has no `version` or `group_size` keys. The source's config.json (with the processors' config
edits, e.g. QuaRot's untied lm_head), tokenizer and `*.py` files are copied.

Tensors per type are ascendv1's (format/ascendv1/tensors.py), except that W8A8's `deq_scale` is always float32.
This version writes the types protocol.md §4.8 lists: W8A8 (static) and W8A8_DYNAMIC per channel, W8A8_MXFP8,
W4A4_MXFP4 and W4A4_MXFP4_DUALSCALE (MX blocks of 32), FA3 on diffusion transformers (`<attn>.fa_{q,k,v}.scale/
offset` tagged FAQuant with `fa_quant_type: FAKQuant`, the per-attention `<attn>.quant_type` strings),
online-rotation matrices of diffusion attention (FLOAT) and non-fusion smoothing. What the established saver
refuses is refused before any weight is read, in favour of ascendv1_saver: every other type (W8A16, per-group,
W4A8_MXFP, FP8, W4A4/W4A8 int4, PD-mix, ...), KV-cache quantization, QuaRot's extra info and online rotations of
text models, W16A16S, SVDQuant's low-rank branch; FA3 is written for diffusion transformers only.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from msmodelslim.core.errors import UnsupportedError
from msmodelslim.format.ascendv1.fa3 import FA_QUANT, GLOBAL as FA_GLOBAL, fa3_tensors
from msmodelslim.format.ascendv1.tensors import FLOAT, linear_tensors
from msmodelslim.format.ascendv1.writer import DescribedTensors
from msmodelslim.format.edits import OutputEdits
from msmodelslim.format.hf_files import copy_model_files, own_tensors, quantized_and_float_modules
from msmodelslim.ir.fa3 import FA3HeadQuant
from msmodelslim.ir.kv_cache import KVCacheQuant
from msmodelslim.ir.lowrank import LowRankResidualLinear
from msmodelslim.ir.online_rotation import input_rotation
from msmodelslim.ir.quant_linear import MX_SCHEMES, QuantLinear
from msmodelslim.ir.sparse_linear import SparseFloatLinear
from msmodelslim.quantizer.scheme import QDType
from msmodelslim.quantizer.scheme import Scheme

WEIGHTS = "quant_model_weight"
DESCRIPTION = "quant_model_description"
SUPPORTED = (Scheme.W8A8, Scheme.W8A8_DYNAMIC, Scheme.W8A8_MXFP8, Scheme.W4A4_MXFP4, Scheme.W4A4_MXFP4_DUALSCALE)
SUPPORTED_NAMES = "W8A8, W8A8_DYNAMIC per channel, W8A8_MXFP8, W4A4_MXFP4 and W4A4_MXFP4_DUALSCALE"
INSTEAD = "save it with ascendv1_saver (vLLM-Ascend and MindIE load that layout)"


def _not_written(what: str) -> str:
    return f"the MindIE layout holds {SUPPORTED_NAMES}, not {what}; {INSTEAD}"


def unsupported_scheme_reason(rules: Iterable) -> Optional[str]:
    """Why a quantization rule's scheme has no MindIE layout here (another type, or per-group weights); None when
    every rule's has one."""
    for rule in rules:
        q = rule.qconfig
        if q.scheme not in SUPPORTED or q.weight.group_size is not None:
            what = f"{q.scheme.value}{' per-group' if q.weight.group_size is not None else ''}"
            return (f"mindie_format_saver does not write {what} in this version (it writes {SUPPORTED_NAMES}); save "
                    f"it with ascendv1_saver")
    return None


def refuse_unsupported_schemes(rules: Iterable) -> None:
    """Called while planning: every linear_quant rule's scheme must have a MindIE layout here."""
    reason = unsupported_scheme_reason(rules)
    if reason:
        raise UnsupportedError(reason)


def file_names(model_quant_type: str | None) -> tuple[str, str]:
    """(description file, weight file stem) for the recorded type."""
    suffix = f"_{model_quant_type.lower()}" if model_quant_type else ""
    return f"{DESCRIPTION}{suffix}.json", f"{WEIGHTS}{suffix}"


class MindIEWriter(DescribedTensors):
    # MindIE looks a linear's weight up in the description as vLLM-Ascend does: a tied table goes in twice.
    TIED_ALIASES = True
    # Schemes with no MindIE layout (each rule's scheme, per-group ones too, is refused first by `step_refusal`).
    UNSUPPORTED: dict[str, str] = {s.value: _not_written(s.value) for s in Scheme if s not in SUPPORTED}
    # Steps of a text or vision-language pipeline whose output this layout cannot hold (the diffusion service
    # checks its own steps: FA3 and online rotations of DiT attention are written).
    UNSUPPORTED_STEPS = {
        "fa3_quant": f"this version writes the MindIE layout's FA3 entries for diffusion transformers only; {INSTEAD}",
        "float_sparse": _not_written("W16A16S (float_sparse)"),
        "svd_res": _not_written("SVDQuant's low-rank branch (svd_res, the _SVD types)"),
        "flatquant": _not_written("FlatQuant's transforms (flatquant, the _FLATQUANT types)"),
    }
    UNSUPPORTED_KV_CACHE = {d.value: _not_written("a quantized KV cache (C8, dynamic_cache)") for d in QDType}
    UNSUPPORTED_ONLINE_ROTATION = _not_written("QuaRot's run-time rotations (online: true)")

    def __init__(self, out_dir: Path, part_file_size_gb: float, dtype_for: Callable[[str], torch.dtype]) -> None:
        super().__init__(out_dir, part_file_size_gb, dtype_for)
        self.model_quant_type: str | None = None

    @classmethod
    def step_refusal(cls, step) -> Optional[str]:
        """What this layout lacks for a step beyond its type: a quantization rule's scheme (another type, or
        per-group weights), or QuaRot's extra info (optional/quarot.safetensors and its `optional` entry), which
        the established MindIE saver refuses too."""
        if step.type in ("linear_quant", "autoround_quant"):  # autoround_quant's rules are its strategies
            return unsupported_scheme_reason([step] if step.type == "linear_quant" else step.strategies)
        if step.type in ("quarot", "adapt_rotation") and getattr(step, "export_extra_info", False):
            return (f"the MindIE layout has no place for QuaRot's extra info (optional/quarot.safetensors, the global "
                    f"rotation); set export_extra_info: false (the rotation is folded into the weights either way), "
                    f"or {INSTEAD}")
        return None

    def add_module_tree(self, prefix: str, root: nn.Module) -> None:
        for name, module in quantized_and_float_modules(prefix, root):
            if isinstance(module, QuantLinear):
                per_group = module.group_size is not None and module.scheme not in MX_SCHEMES
                if module.scheme not in SUPPORTED or per_group:  # planning refuses these
                    raise UnsupportedError(f"{name}: mindie_format_saver does not write {module.scheme.value}")
                # bfloat16 selects the float32 deq_scale, which MindIE reads whatever the model's dtype
                for suffix, (tensor, tag) in linear_tensors(module, torch.bfloat16, False).items():
                    self.add(f"{name}.{suffix}", tensor, tag)
                self.model_quant_type = module.scheme.value
                continue
            if isinstance(module, FA3HeadQuant):  # static per-head Q/K/V scales of the FA3 kernel
                for tensor_name, tensor in fa3_tensors(name, module).items():
                    self.add(tensor_name, tensor, FA_QUANT)
                continue
            if (isinstance(module, (KVCacheQuant, SparseFloatLinear, LowRankResidualLinear))
                    or input_rotation(module)):  # planning refuses the steps that make these
                raise UnsupportedError(f"{name}: mindie_format_saver does not write {type(module).__name__}")
            for tensor_name, tensor in own_tensors(name, module):
                self.add_float(tensor_name, tensor)

    # ---- resume (core/resume.py) ------------------------------------------------------------------------
    def resume_state(self) -> dict:
        return {**super().resume_state(), "model_quant_type": self.model_quant_type}

    def restore_state(self, state: dict) -> None:
        super().restore_state(state)
        self.model_quant_type = state["model_quant_type"]

    # ---- files -------------------------------------------------------------------------------------------
    def finish(self, source_dir: Path, edits: OutputEdits | None = None) -> dict:
        """`edits.description`: entries naming no tensor (FA3's `<attn>.quant_type`); `edits.config`: keys set in
        the copied config.json. Extra files and `optional`/`metadata` entries are refused while planning."""
        edits = edits or OutputEdits()
        if edits.files or edits.optional or edits.metadata:
            raise UnsupportedError(f"mindie_format_saver cannot hold {sorted({*edits.files, *edits.optional})} "
                                   f"(extra files, optional or metadata entries); {INSTEAD}")
        description_file, stem = file_names(self.model_quant_type)
        if self.shards.limit == 0:
            self.shards.finish(lambda i, n: f"{stem}.safetensors", None)
        else:
            self.shards.finish(lambda i, n: f"{stem}-{i:05d}-of-{n:05d}.safetensors", f"{stem}.safetensors.index.json")
        description = {**self.description, "model_quant_type": self.model_quant_type or FLOAT}
        if FA_QUANT in self.description.values():
            description.update(FA_GLOBAL)
        description.update(edits.description)
        (self.out_dir / description_file).write_text(json.dumps(description, indent=4), encoding="utf-8")
        copy_model_files(source_dir, self.out_dir, edits.config)
        return description
