"""`quarot`: offline QuaRot (Ashkboos et al., "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs",
NeurIPS 2024), the rotations that fold into the weights and cost nothing at run time.

1. Fold every RMSNorm's weight into what reads it (the final norm into lm_head).
2. Rotate the residual stream by Q = H·diag(±1)/√d (random Hadamard, signs from `seed`): embedding E·Q,
   readers W·Q, writers Qᵀ·W (rotate.py). In MoE blocks the readers are the router and every expert's
   gate/up (routed and shared), the writers every expert's down. A vision-language model's merger (and DeepStack
   mergers), whose outputs are scattered into the stream, are writers outside the decoder layers
   (outside_writers), rotated when their weights are read (the vision tower is a block of its own).
3. Rotate each attention value head by a random Hadamard of the head size: v_proj rows and o_proj columns;
   for multi-head latent attention (DeepSeek-V3) the V rows of kv_b_proj and the o_proj columns.
Outlier channels of the residual stream are spread over all channels, so the activations entering q/k/v,
gate/up (and q_a/kv_a, the experts) and o_proj quantize with far less error. The float model's output is
unchanged. Where in a block this applies is the family's `RotationStructure` (model/rotation.py).

With `online: true`, o_proj's and (in `down_proj_online_layers`) down_proj's inputs are also rotated at run time
(online.py); those rotations travel with the layers into the saved checkpoint.

With tied embeddings, step 1 changes lm_head but not the embedding, so the output unties them: lm_head.weight
is written on its own and config.json gets tie_word_embeddings: false. A multi-token-prediction layer, which
the model does not build, is rotated by `rotate_mtp` (mtp.py) from its checkpoint tensors.

    - type: quarot
      seed: 0
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from msmodelslim.core.errors import ProcessingError, UnsupportedError
from msmodelslim.core.logging import get_logger
from msmodelslim.format.edits import OutputEdits
from msmodelslim.model.passthrough import MTP, PassThroughGroup
from msmodelslim.model.rotation import StreamMtpRotation
from msmodelslim.processor.base import Processor, ProcessorContext, register_processor
from msmodelslim.ir.online_rotation import attach_rotation
from msmodelslim.processor.quarot import mtp, rotate
from msmodelslim.processor.quarot.config import QuaRotConfig
from msmodelslim.processor.quarot.hadamard import block_diagonal, random_rotation
from msmodelslim.processor.quarot.online import OnlineSites, plan_online_sites
from msmodelslim.processor.quarot.rotate import ValueHeads

log = get_logger("quarot")
ROTATION_FILE = "optional/quarot.safetensors"


def _rms_norm(module: nn.Module, name: str) -> nn.Module:
    if "RMSNorm" not in type(module).__name__ or getattr(module, "bias", None) is not None:
        raise UnsupportedError(f"quarot: {name} is a {type(module).__name__}; the rotation is exact only through "
                               f"an RMSNorm without bias")
    return module


def _has_float_weight(module: nn.Module) -> bool:
    """nn.Linear or a router (weight [E, H]); a QuantLinear holds integer codes and no `weight`."""
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.is_floating_point() and weight.dim() == 2


@register_processor("quarot")
class QuaRotProcessor(Processor):
    rewrites_activations = True
    changes_outside_blocks = True  # rotates the embedding and the head in prepare_model

    def __init__(self, config: QuaRotConfig, context: ProcessorContext) -> None:
        if context.structure.rotation is None:
            raise UnsupportedError(f"quarot: adapter {context.adapter_name} does not describe where to rotate "
                                   f"(ModelStructure.rotation, the QuaRot interface)")
        self.config = config
        self.context = context
        self.structure = context.structure.rotation
        self.value_heads = {layout: self._value_heads(layout) for layout in {h.layout for h in self.structure.heads}}
        if not self.structure.heads:
            log.info("quarot: adapter %s describes no value-head rotation; only the residual stream rotates",
                     context.adapter_name)
        self.q: torch.Tensor | None = None
        self.head_q: dict[str, torch.Tensor] = {}
        self.final_gain: torch.Tensor | None = None  # the final norm's weight before folding (for the MTP layer)
        self.pending_writers: list[str] = []  # outside writers in a block not read at prepare_model
        self.block_names: Optional[list[str]] = None  # the walk's blocks, known once check_model ran
        self.online = OnlineSites()  # planned by check_model when config.online

    def _value_heads(self, layout: str) -> ValueHeads:
        """Where the value heads sit, from the adapter's attention shape (GQA) or MLA shape."""
        if layout == "mla":
            if self.context.mla is None:
                raise UnsupportedError(f"quarot: adapter {self.context.adapter_name} describes a multi-head latent "
                                       f"attention head rotation but gives no MLA shape (mla_shape())")
            return ValueHeads.mla(self.context.mla)
        if self.context.attention is None:
            raise UnsupportedError(f"quarot: adapter {self.context.adapter_name} gives no attention shape for the "
                                   f"value-head rotation")
        return ValueHeads.gqa(self.context.attention)

    @property
    def needs_calibration(self) -> bool:
        return False

    def claims(self, linear_names: list[str]) -> dict[str, str]:
        return {}

    def check_model(self, model: nn.Module, block_names: list[str]) -> None:
        """On the empty model: every module of a block that reads a hidden-size input must be a reader or
        writer of the structure, or the rotation would silently break it (e.g. a router or an indexer the
        family's structure forgot); every norm folded must be an RMSNorm without bias."""
        s = self.structure
        _rms_norm(model.get_submodule(s.final_norm), s.final_norm)
        hidden = model.get_submodule(s.embedding).weight.shape[1]
        self._outside_writers(model, hidden)
        self.block_names = list(block_names)
        listed = [rotate.pattern_regex(p) for p in (*s.readers, *s.writers, *s.not_readers)]
        norms = {n for n, _ in s.norm_readers}
        for block_name in block_names:
            if not self.context.structure.is_decoder_layer(block_name):
                continue  # e.g. a VLM's vision tower: none of its modules reads the residual stream
            for name, module in model.get_submodule(block_name).named_modules():
                if name in norms:
                    _rms_norm(module, f"{block_name}.{name}")
                weight = getattr(module, "weight", None)
                if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != hidden:
                    continue
                if not any(r.fullmatch(name) for r in listed):
                    raise UnsupportedError(
                        f"quarot: {block_name}.{name} ({type(module).__name__}) reads the hidden size {hidden} but "
                        f"adapter {self.context.adapter_name}'s RotationStructure lists it neither as a reader nor "
                        f"as a writer; rotating the residual stream would break it")
        if self.config.online:
            heads = {h.output: self.value_heads[h.layout].output_heads for h in s.heads}
            if not heads:
                log.warning("quarot: adapter %s describes no value-head rotation, so no o_proj is rotated online",
                            self.context.adapter_name)
            self.online = plan_online_sites(model, block_names, self.context.structure, heads, self.config,
                                            self.context.scheme_of)
            log.info("quarot online: %s", self.online.summary())

    def _outside_writers(self, model: nn.Module, hidden: int) -> list[str]:
        """The linears outside the decoder layers that write into the residual stream (a VLM's vision merger), each
        checked to be a float linear producing the hidden size."""
        names = []
        modules = dict(model.named_modules())
        for pattern in self.structure.outside_writers:
            found = rotate.matching(modules, pattern)
            if not found:
                raise UnsupportedError(f"quarot: adapter {self.context.adapter_name} names {pattern} as writing into "
                                       f"the residual stream, but the model has no such module")
            for name in found:
                if not isinstance(modules[name], nn.Linear) or modules[name].out_features != hidden:
                    raise UnsupportedError(f"quarot: {name} ({type(modules[name]).__name__}) is named as writing "
                                           f"into the residual stream but is not a linear producing the hidden "
                                           f"size {hidden}")
            names += found
        return names

    def _rotation(self, hidden: int) -> torch.Tensor:
        size = hidden if self.config.block_size == -1 else self.config.block_size
        if hidden % size:
            raise UnsupportedError(f"quarot: block_size {size} does not divide the hidden size {hidden}")
        q, is_hadamard = random_rotation(size, self.config.seed)
        if not is_hadamard:
            log.warning("quarot: no Hadamard matrix of order %d is known here; using a random orthogonal rotation "
                        "(still exact in float, spreads outliers less evenly)", size)
        return block_diagonal(q, hidden // size).float()

    def prepare_model(self, model: nn.Module) -> None:
        s = self.structure
        embedding, lm_head = model.get_submodule(s.embedding), model.get_submodule(s.lm_head)
        self.q = self._rotation(embedding.weight.shape[1])
        self.head_q = {layout: random_rotation(where.head_dim, self.config.seed + 1)[0].float()
                       for layout, where in self.value_heads.items()}
        if lm_head.weight.data_ptr() == embedding.weight.data_ptr():  # tied: give lm_head its own table
            lm_head.weight = nn.Parameter(lm_head.weight.detach().clone(), requires_grad=False)
        final_norm = _rms_norm(model.get_submodule(s.final_norm), s.final_norm)
        self.final_gain = final_norm.weight.detach().float().clone()
        with torch.no_grad():
            rotate.fold_norm(final_norm.weight.float() + s.norm_offset, [lm_head.weight])
            final_norm.weight.fill_(1.0 - s.norm_offset)
        rotate.rotate_reader(lm_head.weight, self.q)
        rotate.rotate_reader(embedding.weight, self.q)
        # A writer inside a block that is not read yet (a layer_wise run reads the vision tower when its turn comes)
        # is rotated by after_forward of that block; the others now.
        self.pending_writers = []
        for name in self._outside_writers(model, embedding.weight.shape[1]):
            writer = model.get_submodule(name)
            if writer.weight.is_meta:
                if self.block_names is not None and not any(name.startswith(b + ".") for b in self.block_names):
                    raise ProcessingError(f"quarot: {name} writes into the residual stream but is neither read yet "
                                          f"nor inside a block of the walk, so it would never be rotated")
                self.pending_writers.append(name)
            else:
                rotate.rotate_writer(writer.weight, writer.bias, self.q)
        for name in s.head_stream_readers:
            rotate.rotate_stream_reader(model.get_parameter(name), self.q)

    def before_forward(self, block_name: str, block: nn.Module) -> None:
        if self.q is None:
            raise ProcessingError("quarot: prepare_model was not called before the first block")

    def after_forward(self, block_name: str, block: nn.Module) -> None:
        s = self.structure
        if not self.context.structure.is_decoder_layer(block_name):  # a VLM's vision tower: its stream writers
            self._rotate_pending_writers(block_name, block)
            return
        modules = dict(block.named_modules())
        for name, _ in s.norm_readers:
            if name in modules:
                _rms_norm(modules[name], f"{block_name}.{name}")
        listed = [*s.readers, *s.writers, *(n for h in s.heads for n in (h.value, h.output))]
        for pattern in listed:
            for name in rotate.matching(modules, pattern):
                if not _has_float_weight(modules[name]):
                    raise ProcessingError(f"quarot: {block_name}.{name} is already quantized; put quarot first in "
                                          f"spec.process")
        rotate.rotate_block(dict(block.named_parameters()), s, self.q, self._head_rotations())
        for name, rotation in self.online.rotations.items():
            if name.startswith(block_name + "."):
                attach_rotation(block.get_submodule(name[len(block_name) + 1 :]), rotation)

    def _rotate_pending_writers(self, block_name: str, block: nn.Module) -> None:
        """The outside writers inside `block` that prepare_model found unread, now that the block is read."""
        inside = [n for n in self.pending_writers if n.startswith(block_name + ".")]
        for name in inside:
            writer = block.get_submodule(name[len(block_name) + 1 :])
            if not _has_float_weight(writer):
                raise ProcessingError(f"quarot: {name} is already quantized; put quarot first in spec.process")
            rotate.rotate_writer(writer.weight, writer.bias, self.q)
        self.pending_writers = [n for n in self.pending_writers if n not in inside]

    def _head_rotations(self) -> rotate.HeadRotations:
        return {layout: (where, self.head_q[layout]) for layout, where in self.value_heads.items()}

    def rotate_mtp(self, tensors: dict[str, torch.Tensor], prefix: str,
                   post_norm_hidden: bool = False) -> dict[str, torch.Tensor]:
        """The multi-token-prediction layer's checkpoint tensors ({full name under `prefix`, e.g.
        'model.layers.61.': float32 tensor}, the same names back), rotated as this run rotated the main model;
        see mtp.rotate_mtp_layer. post_norm_hidden: the engine feeds the MTP the main model's post-final-norm
        hidden state (approximate, see mtp.py) rather than the pre-norm one (exact). Call after prepare_model."""
        if self.q is None:
            raise ProcessingError("quarot: rotate_mtp needs the rotation, made in prepare_model")
        if self.structure.mtp is None:
            raise UnsupportedError(f"quarot: adapter {self.context.adapter_name} describes no multi-token-prediction "
                                   f"layer (RotationStructure.mtp)")
        return mtp.rotate_mtp_layer(tensors, prefix, self.structure, self.q, self._head_rotations(),
                                    final_norm_weight=self.final_gain if post_norm_hidden else None)

    def changes_passthrough(self, group: PassThroughGroup) -> bool:
        return group.kind == MTP and self.structure.mtp is not None

    def transform_passthrough(self, group: PassThroughGroup, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if isinstance(self.structure.mtp, StreamMtpRotation):  # DeepSeek-V4: fed the pre-collapse streams, exact
            if self.q is None:
                raise ProcessingError("quarot: rotating the MTP layers needs the rotation, made in prepare_model")
            return mtp.rotate_stream_mtp_layers(tensors, group.name + ".", self.structure, self.q,
                                                self._head_rotations())
        # vLLM feeds the MTP layer the main model's post-final-norm hidden state, so rotate for that input (exact
        # only when the final norm's gain is uniform; see mtp.py) rather than for the pre-norm one.
        log.warning("quarot: rotating the multi-token-prediction layer %s for the post-final-norm hidden state the "
                    "engine feeds it; this is exact only for a uniform final-norm gain, so speculative-decoding "
                    "acceptance may drop slightly", group.name)
        return self.rotate_mtp(tensors, group.name + ".", post_norm_hidden=True)

    def output_edits(self) -> OutputEdits:
        edits = OutputEdits(config={"tie_word_embeddings": False})
        if self.config.export_extra_info and self.q is not None:
            edits.files[ROTATION_FILE] = {"global_rotation": self.q.contiguous()}
            edits.optional["quarot"] = {"rotation_map": {"global_rotation": ROTATION_FILE}}
        if self.online.rotations:
            edits.metadata["quarot"] = self.online.metadata(self.config.max_tp_size)
        return edits
