"""ascendv1 writer: streams tensors into size-bounded safetensors shards as blocks finish, then writes the
index, `quant_model_description.json` and the copied Hugging Face files.

Shard file names follow the established tool: `quant_model_weights-00001-of-0000N.safetensors` plus
`quant_model_weights.safetensors.index.json`, or a single `quant_model_weights.safetensors` when
part_file_size is 0 (then the whole quantized model is held until the end).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from msmodelslim.format.ascendv1.kv_cache import C8, GLOBAL as C8_GLOBAL, kv_cache_tensors
from msmodelslim.format.ascendv1.fa3 import FA_QUANT, GLOBAL as FA_GLOBAL, fa3_tensors
from msmodelslim.format.ascendv1.tensors import FLOAT, flat_tag, linear_tensors, sparse_float_tensors
from msmodelslim.format.edits import OutputEdits
from msmodelslim.format.hf_files import copy_model_files, own_tensors, quantized_and_float_modules, write_extra_files
from msmodelslim.format.shards import ShardStream
from msmodelslim.ir.fa3 import FA3HeadQuant
from msmodelslim.ir.flat_transform import MAX_SUPPORTED_TP
from msmodelslim.ir.lowrank import LowRankResidualLinear
from msmodelslim.ir.online_rotation import input_rotation, unrotated_weight
from msmodelslim.ir.kv_cache import KVCacheQuant
from msmodelslim.ir.quant_linear import QuantLinear
from msmodelslim.ir.sparse_linear import SparseFloatLinear
from msmodelslim.quantizer.scheme import Scheme

DESCRIPTION = "quant_model_description.json"
WEIGHTS = "quant_model_weights"
INDEX = f"{WEIGHTS}.safetensors.index.json"

# Lowest to highest; `model_quant_type` reports the highest present (informational for vLLM-Ascend; the 310P
# compression tool reads it to find W8A8S models, so W8A8S ranks first, as the established v0 writer reports it).
# The floating-point types follow the established order (formats.md A.2); W4A16_MXFP4 sits with W4A16.
# W4A4_MXFP4_SVD (SVDQuant) ranks above every established type; the other _SVD types are not in the list and never
# set model_quant_type, as in the established writer.
TYPE_PRIORITY = ["FLOAT", "W16A16S", "W8A16", "W4A16", "W4A16_MXFP4", "W8A8_DYNAMIC", "W4A8_DYNAMIC", "W8A8_MIX",
                 "W8A8", "W8A8FP8_DYNAMIC", "W8A8_MXFP8", "W4A8_MXFP", "W4A4_DYNAMIC", "W4A4_MXFP4", "W4A4_MXFP4_DUALSCALE",
                 "W4A4_MXFP4_SVD",
                 "W8A8S"]


class DescribedTensors:
    """Tensors streamed into shards, each with its tag in a description: what the ascendv1 and the MindIE writers
    share. Float tensors are written in the checkpoint's own dtype (`dtype_for`)."""

    def __init__(self, out_dir: Path, part_file_size_gb: float, dtype_for: Callable[[str], torch.dtype]) -> None:
        self.out_dir = out_dir
        self.shards = ShardStream(out_dir, int(part_file_size_gb * 2**30))
        self.dtype_for = dtype_for
        self.description: dict[str, str] = {}

    def add(self, name: str, tensor: torch.Tensor, tag: str | None) -> None:
        """tag None: a tensor the format writes without a description entry (online QuaRot's rotations)."""
        self.shards.add(name, tensor)
        if tag is not None:
            self.description[name] = tag

    def add_float(self, name: str, tensor: torch.Tensor) -> None:
        dtype = self.dtype_for(name) if tensor.is_floating_point() else tensor.dtype
        self.add(name, tensor.to(dtype), FLOAT)

    def add_tied(self, name: str, source: str, tensor: torch.Tensor) -> None:
        """The engines look up every linear's weight in the description, lm_head included: a tied table goes in
        twice."""
        self.add_float(name, tensor)

    def add_passthrough(self, name: str, tensor: torch.Tensor) -> None:
        """A checkpoint tensor the model does not read (e.g. of an MTP layer), written as given, tagged FLOAT."""
        self.add(name, tensor, FLOAT)

    # ---- resume (core/resume.py) ------------------------------------------------------------------------
    def sync_behind(self) -> Callable[[], None]:
        """Make the bytes handed over so far durable, behind the caller; returns the wait for it."""
        return self.shards.sync_behind()

    def resume_state(self) -> dict:
        """Everything this writer has accumulated, as JSON (`sync_behind` makes its bytes durable)."""
        return {"shards": self.shards.state(), "description": self.description}

    def restore_state(self, state: dict) -> None:
        self.shards.restore(state["shards"])
        self.description = dict(state["description"])


class AscendV1Writer(DescribedTensors):
    def __init__(
        self,
        out_dir: Path,
        part_file_size_gb: float,
        model_dtype: torch.dtype,
        is_row_parallel: Callable[[str], bool],
        dtype_for: Callable[[str], torch.dtype],
    ) -> None:
        super().__init__(out_dir, part_file_size_gb, dtype_for)
        self.model_dtype = model_dtype
        self.is_row_parallel = is_row_parallel
        self.group_sizes: set[int] = set()

    # The engines look up every linear's weight in the description, lm_head included: a tied table goes in twice.
    TIED_ALIASES = True
    # Schemes with no ascendv1 type (planning refuses them before any weight is read).
    UNSUPPORTED: dict[str, str] = {
        "W4A16_NVFP4": "dtype nvfp4 (E2M1 with FP8 block scales of 16 and a float32 global scale, NVIDIA's FP4) is a "
                       "protocol extension with no ascendv1 type; save it with the compressed_tensors saver "
                       "(nvfp4-pack-quantized), or use dtype mxfp4 for ascendv1 (W4A16_MXFP4)",
        "W4A4_NVFP4": "dtype nvfp4 (E2M1 with FP8 block scales of 16 and float32 global scales, NVIDIA's FP4) is a "
                      "protocol extension with no ascendv1 type; save it with the compressed_tensors saver "
                      "(nvfp4-pack-quantized), or use dtype mxfp4 for ascendv1 (W4A4_MXFP4)"}

    def add_module_tree(self, prefix: str, root: nn.Module) -> None:
        """Every tensor under `root`: quantized linears in their ascendv1 layout, the rest as FLOAT."""
        for name, module in quantized_and_float_modules(prefix, root):
            if isinstance(module, QuantLinear):
                if module.group_size is not None:
                    self.group_sizes.add(module.group_size)
                for suffix, (tensor, tag) in linear_tensors(module, self.model_dtype, self.is_row_parallel(name)).items():
                    self.add(f"{name}.{suffix}", tensor, tag)
                continue
            if isinstance(module, FA3HeadQuant):  # <attn>.fa_q: static per-head Q/K/V scales of the FA3 kernel
                for tensor_name, tensor in fa3_tensors(name, module).items():
                    self.add(tensor_name, tensor, FA_QUANT)
                continue
            if isinstance(module, KVCacheQuant):  # the attention's int8 cache: named after its k/v projections
                for tensor_name, tensor in kv_cache_tensors(name.rpartition(".")[0], module).items():
                    self.add(tensor_name, tensor, C8)
                continue
            if isinstance(module, SparseFloatLinear):  # float weights in the model's dtype, as FLOAT ones are
                tensors = sparse_float_tensors(module, self.dtype_for(f"{name}.weight"), self.dtype_for(f"{name}.bias"))
                for suffix, (tensor, tag) in tensors.items():
                    self.add(f"{name}.{suffix}", tensor, tag)
                continue
            if isinstance(module, LowRankResidualLinear) or input_rotation(module):
                # a float layer whose tensors are not its function: split by svd_res (W = R + l2·l1) or rotated
                # online (W·Tᵀ) but never quantized; written as the plain layer it computes
                weight = module.folded_weight() if isinstance(module, LowRankResidualLinear) else module.weight
                self.add_float(f"{name}.weight", unrotated_weight(module, weight))
                if module.bias is not None:
                    self.add_float(f"{name}.bias", module.bias)
                continue
            for tensor_name, tensor in own_tensors(name, module):
                self.add_float(tensor_name, tensor)

    # ---- resume (core/resume.py) ------------------------------------------------------------------------
    def resume_state(self) -> dict:
        return {**super().resume_state(), "group_sizes": sorted(self.group_sizes)}

    def restore_state(self, state: dict) -> None:
        super().restore_state(state)
        self.group_sizes = set(state["group_sizes"])

    # ---- files -------------------------------------------------------------------------------------------
    def finish(self, source_dir: Path, edits: OutputEdits | None = None) -> dict:
        """Write the remaining shard, the index and the description; copy the model's config/tokenizer files;
        apply the processors' edits (config keys, extra files such as optional/quarot.safetensors)."""
        edits = edits or OutputEdits()
        if self.shards.limit == 0:
            self.shards.finish(lambda i, n: f"{WEIGHTS}.safetensors", None)
        else:
            self.shards.finish(lambda i, n: f"{WEIGHTS}-{i:05d}-of-{n:05d}.safetensors", INDEX)
        if len(self.group_sizes) > 1:
            raise ValueError(f"ascendv1 has one global group_size, but layers use {sorted(self.group_sizes)}")
        present = set(self.description.values())
        model_quant_type = max((t for t in TYPE_PRIORITY if t in present), key=TYPE_PRIORITY.index, default="Unknown")
        description = dict(self.description)
        description.update({
            "version": "1.0.0",
            "model_quant_type": model_quant_type,
            "metadata": edits.metadata,
            "group_size": next(iter(self.group_sizes), 0),
            "optional": edits.optional,
        })
        if C8 in present:  # what vLLM-Ascend reads to enable the int8 cache (formats.md A.2)
            description.update(C8_GLOBAL)
        if FA_QUANT in present:  # what vLLM-Ascend reads to enable FA quant (formats.md A.2, A.6)
            description.update(FA_GLOBAL)
        if flat_tag(Scheme.W4A4_MXFP4.value) in present:  # the row-parallel transforms' rank blocks (formats.md A.2)
            description["max_supported_tp"] = MAX_SUPPORTED_TP
        description.update(edits.description)  # entries naming no tensor (formats.md A.2/A.6), e.g. the indexer's
        (self.out_dir / DESCRIPTION).write_text(json.dumps(description, indent=4), encoding="utf-8")
        write_extra_files(self.out_dir, edits)
        copy_model_files(source_dir, self.out_dir, edits.config)
        return description
