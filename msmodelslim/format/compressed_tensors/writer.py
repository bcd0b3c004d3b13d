"""compressed-tensors writer (formats.md B): standard Hugging Face shards plus a `quantization_config` in
config.json, which vLLM and transformers read. Layers are grouped by scheme into `config_groups` whose targets
are the layers' exact names; every linear kept in float (lm_head included) is listed in `ignore`. Those names are
the loaders' module names (`config_name`): the tensor names, except where transformers renames a published layout on
load (Qwen2.5-VL's `model.layers.*` / `visual.*` become `model.language_model.layers.*` / `model.visual.*`, and
its compressed-tensors integration matches targets against the renamed modules; vLLM maps both spellings)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import compressed_tensors
import torch
from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, QuantizationStatus
from torch import nn

from msmodelslim.core.errors import UnsupportedError
from msmodelslim.format.compressed_tensors.kv_cache import C8_REASON, kv_cache_scheme, kv_cache_tensors
from msmodelslim.format.compressed_tensors.tensors import linear_tensors, quantization_args
from msmodelslim.format.edits import OutputEdits
from msmodelslim.format.hf_files import copy_model_files, own_tensors, quantized_and_float_modules, write_extra_files
from msmodelslim.format.shards import ShardStream
from msmodelslim.ir.online_rotation import input_rotation
from msmodelslim.ir.kv_cache import FP8KVCacheQuant, KVCacheQuant
from msmodelslim.ir.quant_linear import QuantLinear

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


class CompressedTensorsWriter:
    def __init__(self, out_dir: Path, part_file_size_gb: float, model_dtype: torch.dtype,
                 dtype_for: Callable[[str], torch.dtype],
                 config_name: Optional[Callable[[str], str]] = None) -> None:
        self.out_dir = out_dir
        self.config_name = config_name or (lambda name: name)
        self.shards = ShardStream(out_dir, int(part_file_size_gb * 2**30))
        self.model_dtype = model_dtype
        self.dtype_for = dtype_for
        self.groups: dict[str, tuple[QuantizationScheme, list[str]]] = {}
        self.passthrough_linears: list[str] = []
        self.kv_cache = False  # an FP8 KV cache was written: config.json gets its kv_cache_scheme

    # A tied table (lm_head sharing the embedding) is stored once; transformers and vLLM re-tie it from config.json.
    TIED_ALIASES = False
    # Schemes this format has no representation for (planning refuses them before any weight is read).
    UNSUPPORTED = {"W8A8_MIX": "act scope pd_mix (W8A8_MIX) is an Ascend serving scheme with no compressed-tensors "
                               "equivalent; save with ascendv1_saver, or use act scope per_tensor (static) or "
                               "per_token (dynamic) for compressed_tensors",
                   "W8A8S": "weight method lowbit_sparse (W8A8S) is an Ascend 310P scheme (compressed to W8A8SC there) "
                            "with no compressed-tensors equivalent; save with ascendv1_saver, or use weight method "
                            "minmax/ssz/gptq for compressed_tensors",
                   "W16A16S": "float_sparse (W16A16S) is an Ascend 310P scheme (compressed to W16A16SC there) with no "
                              "compressed-tensors equivalent; save with ascendv1_saver",
                   "W4A4_DYNAMIC": "int4 per-token activations (W4A4_DYNAMIC) have no kernel in vLLM (its only W4A4 "
                                   "compressed-tensors scheme is NVFP4); save with ascendv1_saver",
                   "W4A8_MXFP": "W4A8_MXFP (MXFP4 weights, MXFP8 activations) has no compressed-tensors scheme: the "
                                "library's MXFP4xFP8 preset quantizes activations to FP8 per group of 128 with float "
                                "scales, not MXFP8; save with ascendv1_saver, or use W4A4_MXFP4 (act mxfp4) or "
                                "W4A16_MXFP4 (act float) for compressed_tensors",
                   "W4A4_MXFP4_DUALSCALE": "W4A4_MXFP4_DUALSCALE (float32 scales over the MXFP4 blocks) is an Ascend "
                                           "scheme with no compressed-tensors format; save with ascendv1_saver"}

    # Processing steps whose output this format cannot hold (refused before any weight is read).
    UNSUPPORTED_STEPS = {"fa3_quant": "vLLM has no compressed-tensors scheme for static per-head int8 Q/K/V of the "
                                      "attention kernel (FA3); save with ascendv1_saver, or remove fa3_quant",
                         "svd_res": "vLLM has no compressed-tensors scheme for a quantized layer plus a float low-rank "
                                    "branch (SVDQuant's svd_lowrank_l1/l2), and compressed-tensors no such tensors; "
                                    "save with ascendv1_saver, or remove svd_res",
                         "flatquant": "vLLM has no compressed-tensors scheme that applies FlatQuant's per-layer "
                                      "Kronecker transform and clip ratio to the input at run time; save with "
                                      "ascendv1_saver, or remove flatquant"}

    # quarot with online: true (checked by app/quantize_checks.py beside UNSUPPORTED_STEPS).
    UNSUPPORTED_ONLINE_ROTATION = ("vLLM's compressed-tensors schemes do not rotate a layer's input at run time with "
                                   "saved heads_rotation / kronecker_rotation_m/n matrices; save with ascendv1_saver, "
                                   "or use quarot with online: false")

    # KV-cache dtypes (dynamic_cache qconfig) this format cannot hold: only vLLM's FP8 per-tensor cache.
    UNSUPPORTED_KV_CACHE = {"int8": C8_REASON}

    def add_float(self, name: str, tensor: torch.Tensor) -> None:
        dtype = self.dtype_for(name) if tensor.is_floating_point() else tensor.dtype
        self.shards.add(name, tensor.to(dtype))

    def add_tied(self, name: str, source: str, tensor: torch.Tensor) -> None:
        """`name` is the same tensor as `source`, already written: nothing to store."""

    def add_passthrough(self, name: str, tensor: torch.Tensor) -> None:
        """A checkpoint tensor the model does not read (e.g. of an MTP layer), written as given. vLLM raises for a
        linear that no config group targets and `ignore` does not name, and loads an MTP layer's linears with the
        model's quantization config: every 2-D `.weight` passed through goes into `ignore` (an entry that names a
        non-linear, such as an embedding, is never consulted)."""
        self.shards.add(name, tensor)
        if name.endswith(".weight") and tensor.dim() == 2:
            self.passthrough_linears.append(name[: -len(".weight")])

    def add_module_tree(self, prefix: str, root: nn.Module) -> None:
        for name, module in quantized_and_float_modules(prefix, root):
            if isinstance(module, QuantLinear):
                if module.svd_rank is not None:  # never silently without its low-rank branch
                    raise UnsupportedError(f"{name}: svd_res cannot be saved as compressed_tensors: "
                                           f"{self.UNSUPPORTED_STEPS['svd_res']}")
                if input_rotation(module):
                    raise UnsupportedError(f"{name}: quarot online cannot be saved as compressed_tensors: "
                                           f"{self.UNSUPPORTED_ONLINE_ROTATION}")
                weights, act, fmt = quantization_args(module)
                key = json.dumps([weights.model_dump(mode="json"), act and act.model_dump(mode="json"), fmt])
                if key not in self.groups:
                    scheme = QuantizationScheme(targets=[], weights=weights, input_activations=act, format=fmt)
                    self.groups[key] = (scheme, [])
                self.groups[key][1].append(name)
                for suffix, tensor in linear_tensors(module, self.model_dtype).items():
                    self.shards.add(f"{name}.{suffix}", tensor)
                continue
            if isinstance(module, FP8KVCacheQuant):  # vLLM's FP8 cache: k_scale/v_scale on the attention itself
                for tensor_name, tensor in kv_cache_tensors(name.rpartition(".")[0], module).items():
                    self.shards.add(tensor_name, tensor)
                self.kv_cache = True
                continue
            if isinstance(module, KVCacheQuant):  # planning refuses C8 for this format before any weight is read
                raise UnsupportedError(f"{name}: {C8_REASON}")
            for tensor_name, tensor in own_tensors(name, module):
                self.add_float(tensor_name, tensor)

    # ---- resume (core/resume.py) ------------------------------------------------------------------------
    def sync_behind(self) -> Callable[[], None]:
        """Make the bytes handed over so far durable, behind the caller; returns the wait for it."""
        return self.shards.sync_behind()

    def resume_state(self) -> dict:
        """Everything this writer has accumulated, as JSON (`sync_behind` makes its bytes durable)."""
        groups = [[key, scheme.model_dump(mode="json"), names] for key, (scheme, names) in self.groups.items()]
        return {"shards": self.shards.state(), "groups": groups, "passthrough_linears": self.passthrough_linears,
                "kv_cache": self.kv_cache}

    def restore_state(self, state: dict) -> None:
        self.shards.restore(state["shards"])
        self.groups = {key: (QuantizationScheme.model_validate(scheme), list(names))
                       for key, scheme, names in state["groups"]}
        self.passthrough_linears = list(state["passthrough_linears"])
        self.kv_cache = state["kv_cache"]

    def quantization_config(self, ignore: list[str]) -> dict:
        groups = {}
        for i, (scheme, names) in enumerate(self.groups.values()):
            groups[f"group_{i}"] = scheme.model_copy(update={"targets": [self.config_name(n) for n in names]})
        formats = {s.format for s in groups.values()} or {"dense"}  # "dense": only the KV cache is quantized
        config = QuantizationConfig(
            config_groups=groups,
            format=formats.pop() if len(formats) == 1 else "mixed-precision",
            quantization_status=QuantizationStatus.COMPRESSED,
            ignore=sorted(self.config_name(n) for n in ignore),
            kv_cache_scheme=kv_cache_scheme() if self.kv_cache else None,
        )
        return {"version": compressed_tensors.__version__, "quant_method": "compressed-tensors",
                "sparsity_config": {}, "transform_config": {},
                **config.model_dump(mode="json", exclude={"quant_method"})}

    def finish(self, source_dir: Path, edits: OutputEdits | None = None, float_linears: list[str] = ()) -> dict:
        """Name the shards, write config.json with its quantization_config, copy the tokenizer files."""
        edits = edits or OutputEdits()
        if self.shards.shard_count <= 1:
            self.shards.finish(lambda i, n: SINGLE, None)
        else:
            self.shards.finish(lambda i, n: f"model-{i:05d}-of-{n:05d}.safetensors", INDEX)
        ignore = list(float_linears) + self.passthrough_linears
        quantization_config = self.quantization_config(ignore) if self.groups or self.kv_cache else None
        write_extra_files(self.out_dir, edits)
        copy_model_files(source_dir, self.out_dir, edits.config, quantization_config)
        return quantization_config or {}
