"""`--model_type default`: any decoder-only model that transformers' AutoModelForCausalLM builds from config.json.

Nothing about the model is written down in advance: the adapter builds the model on the meta device (no weight
read), splits fused MoE experts into per-expert linears (model/moe.py), and infers where the decoder layers are
and which algorithms its structure supports (model/inferred_structure.py); the log says what it found.
linear_quant works on every such model; smoothing and rotation only where the inferred structure supports
them (the processors refuse by name otherwise). Its practices are the generic ones of `lab_practice/default`,
always asked for (they were never checked on the model at hand).

Calibration forwards record what the model passes to *every* block, not only the first: models with per-layer
attention (sliding-window and full layers, local and global rotary tables, as Gemma 2/3 have) give each layer
type its own mask and position embeddings. No remote code runs unless --trust_remote_code True.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Generator

import torch
from torch import nn

from msmodelslim.core.errors import UnsupportedError
from msmodelslim.core.logging import get_logger
from msmodelslim.model.hf_config import load_hf_config, require_local_dir
from msmodelslim.model.inferred_structure import InferredStructure, infer_structure
from msmodelslim.model.interface import AttentionShape, ModelStructure, ProcessRequest, block_hidden_state
from msmodelslim.model.moe import stacked_source, unfuse_experts
from msmodelslim.model.registry import causal_lm_class_name, hf_families, multimodal_refusal
from msmodelslim.model.transformers_model import TransformersModel

log = get_logger("model.default")


class _AllBlocksRecorded(Exception):
    """Raised by the last block's stand-in forward: the rest of the model's forward is not needed."""


def _to_device_shared(value: Any, device: torch.device, moved: dict[int, torch.Tensor]) -> Any:
    """`value` on `device`, each tensor moved once: blocks share one mask or rotary table, and so do the copies."""
    if isinstance(value, torch.Tensor):
        if id(value) not in moved:
            moved[id(value)] = value.to(device)
        return moved[id(value)]
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device_shared(v, device, moved) for v in value)
    if isinstance(value, dict):
        return {k: _to_device_shared(v, device, moved) for k, v in value.items()}
    return value


class DefaultAdapter(TransformersModel):
    structure = ModelStructure()  # the class's placeholder; each instance infers its own (see __init__)

    def __init__(self, model_type: str, model_path: str | Path, trust_remote_code: bool = False) -> None:
        path = require_local_dir(model_path, "--model_path")
        self._refuse_what_it_cannot_build(load_hf_config(path, trust_remote_code), path, trust_remote_code)
        super().__init__(model_type, model_path, trust_remote_code)
        self.attn_implementation = self._attention_kernel()
        self._routed_experts = 0
        skeleton = super().init_skeleton()
        self._refuse_renamed_checkpoint(skeleton)
        self.inferred: InferredStructure = infer_structure(skeleton, self.config, self._gqa_shape(),
                                                           self._routed_experts)
        self.structure = self.inferred.structure
        self._skeleton: nn.Module | None = skeleton  # handed out by the first init_skeleton()
        log.info("default adapter for %s (%s): %s", self.model_path, type(skeleton).__name__, self.inferred.describe())
        dedicated = hf_families().get(self.config.model_type)
        if dedicated:
            log.info("config.json's model_type %r has a dedicated adapter (--model_type %s, ...), with described "
                     "structure and its own practices", self.config.model_type, dedicated[0])

    @staticmethod
    def _refuse_what_it_cannot_build(config, path: Path, trust_remote_code: bool) -> None:
        """From config.json alone, before the checkpoint is opened: text decoder-only models only."""
        hf_type = config.model_type
        refusal = multimodal_refusal(config.to_dict(), path)
        if refusal is not None:
            raise UnsupportedError(refusal)
        if getattr(config, "is_encoder_decoder", False):
            raise UnsupportedError(f"{path}: config.json's model_type {hf_type!r} is an encoder-decoder model; the "
                                   f"default adapter quantizes decoder-only models")
        remote = trust_remote_code and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
        if causal_lm_class_name(hf_type) is None and not remote:
            raise UnsupportedError(
                f"{path}: config.json's model_type {hf_type!r} is not a decoder-only architecture transformers knows "
                f"(AutoModelForCausalLM cannot build it); the default adapter quantizes those"
                + ("" if trust_remote_code else ", or models with their own code under --trust_remote_code True"))

    def _refuse_renamed_checkpoint(self, skeleton: nn.Module) -> None:
        """Every weight the built model expects must be in the checkpoint under its name (safetensors headers
        only). Some checkpoints use older names that transformers renames while loading (Mixtral's
        block_sparse_moe.experts.<e>.w1): reading them is not implemented, and is refused before any weight read."""
        available = set(self.checkpoint.names())
        tied = getattr(self.config, "tie_word_embeddings", False)
        missing = [n for n in skeleton.state_dict() if n not in available
                   and not ((source := stacked_source(n)) is not None and source.tensor in available)
                   and not (tied and n.endswith("lm_head.weight"))]
        if missing:
            instead = sorted(available - set(skeleton.state_dict()))
            raise UnsupportedError(
                f"{self.model_path}: the model transformers builds from config.json expects {len(missing)} weight(s) "
                f"the checkpoint does not hold under that name (e.g. {', '.join(missing[:2])}); it holds "
                f"{', '.join(instead[:2]) or 'nothing else'} instead. transformers renames such weights while loading; "
                f"msmodelslim reads checkpoints by the model's own names and does not rename them yet (nothing was read)")

    def _attention_kernel(self) -> str:
        """sdpa where the architecture supports it, else transformers' eager attention (e.g. Gemma 2's soft-capping)."""
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(self.config), None)
        return "eager" if model_class is not None and not getattr(model_class, "_supports_sdpa", True) else "sdpa"

    def _gqa_shape(self) -> AttentionShape | None:
        try:
            return super().attention_shape()
        except (AttributeError, TypeError, ZeroDivisionError):  # config.json names its heads otherwise
            return None

    def attention_shape(self) -> AttentionShape | None:
        return self._gqa_shape() if any(g.kind == "ov" for g in self.structure.smooth_subgraphs) else None

    def mla_shape(self):
        return None  # no multi-head latent attention subgraphs or rotations are inferred

    def prepare_skeleton(self, model: nn.Module) -> None:
        self._routed_experts = unfuse_experts(model)

    def init_skeleton(self) -> nn.Module:
        skeleton, self._skeleton = self._skeleton, None
        return skeleton if skeleton is not None else super().init_skeleton()

    # ---- calibration forward: every block's own arguments ----------------------------------------------------
    def _record_block_arguments(self, model: nn.Module, batch: dict[str, torch.Tensor],
                                as_tuple: bool) -> list[tuple[tuple, dict]]:
        """One forward of the model with every block's forward replaced by a recorder that keeps the block's
        arguments and hands the hidden states on (as a tensor, or as a 1-tuple for models that index [0])."""
        blocks = [model.get_submodule(name) for name in self.block_names(model)]
        records: list[tuple[tuple, dict]] = []

        def recorder(index: int):
            def forward(*args, **kwargs):
                if not args:
                    args = (kwargs.pop("hidden_states"),)
                records.append((args, kwargs))
                if index == len(blocks) - 1:
                    raise _AllBlocksRecorded
                return (args[0],) if as_tuple else args[0]
            return forward

        for index, block in enumerate(blocks):
            block.forward = recorder(index)  # an instance attribute: the block keeps its own attributes and hooks
        try:
            with torch.no_grad():
                model(**{k: v.to("cpu") for k, v in batch.items()}, use_cache=False)
        except _AllBlocksRecorded:
            pass
        finally:
            for block in blocks:
                del block.forward
        return records

    def capture_block_inputs(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> list[tuple[tuple, dict]]:
        """(args, kwargs) the model passes to each block for `batch`. Recorded twice at most: the model must hand
        each block's output to the next block unchanged, or the block-by-block forward would differ from it."""
        for as_tuple in (False, True):
            records = self._record_block_arguments(model, batch, as_tuple)
            if len(records) == len(self.block_names(model)) and all(
                    records[i][0][0] is records[i - 1][0][0] for i in range(1, len(records))):
                return records
        raise UnsupportedError(
            f"the default adapter cannot run {type(model).__name__} block by block (it changes the hidden states "
            f"between its decoder layers, or skips some), which calibration needs; use a pipeline without "
            f"calibration data (e.g. linear_quant with dynamic or no activation quantization), or an adapter")

    def generate_model_forward(
        self, model: nn.Module, inputs: dict[str, torch.Tensor]
    ) -> Generator[ProcessRequest, Any, None]:
        records = self.capture_block_inputs(model, inputs)
        hidden = records[0][0][0]
        arguments = [(args[1:], kwargs) for args, kwargs in records]  # not the hidden states: the spill moves those
        del records
        device, moved = inputs["input_ids"].device, {}
        hidden = hidden.to(device)
        for name, (rest, kwargs) in zip(self.block_names(model), arguments):
            request = ProcessRequest(name, model.get_submodule(name), (hidden,) + _to_device_shared(rest, device, moved),
                                     _to_device_shared(kwargs, device, moved))
            hidden = None  # the runner owns it now (it may move it to disk)
            output = yield request
            hidden = block_hidden_state(output)
