"""`quarot`: offline QuaRot (Ashkboos et al., "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs",
NeurIPS 2024), the rotations that fold into the weights and cost nothing at run time.

1. Fold every RMSNorm's weight into the linears that read it (the final norm into lm_head).
2. Rotate the residual stream by Q = H·diag(±1)/√d (random Hadamard, signs from `seed`): embedding E·Q,
   readers W·Q, writers Qᵀ·W (rotate.py).
3. Rotate each attention value head by a random Hadamard of the head size (v_proj rows, o_proj columns).
Outlier channels of the residual stream are spread over all channels, so the activations entering q/k/v,
gate/up and o_proj quantize with far less error. The float model's output is unchanged.

With tied embeddings, step 1 changes lm_head but not the embedding, so the output unties them: lm_head.weight
is written on its own and config.json gets tie_word_embeddings: false.

    - type: quarot
      seed: 0
"""
from __future__ import annotations

import torch
from torch import nn

from msmodelslim.core.errors import ProcessingError, UnsupportedError
from msmodelslim.core.logging import get_logger
from msmodelslim.format.edits import OutputEdits
from msmodelslim.processor.base import Processor, ProcessorContext, register_processor
from msmodelslim.processor.quarot import rotate
from msmodelslim.processor.quarot.config import QuaRotConfig
from msmodelslim.processor.quarot.hadamard import block_diagonal, random_rotation

log = get_logger("quarot")
ROTATION_FILE = "optional/quarot.safetensors"


def _rms_norm(module: nn.Module, name: str) -> nn.Module:
    if "RMSNorm" not in type(module).__name__ or getattr(module, "bias", None) is not None:
        raise UnsupportedError(f"quarot: {name} is a {type(module).__name__}; the rotation is exact only through "
                               f"an RMSNorm without bias")
    return module


@register_processor("quarot")
class QuaRotProcessor(Processor):
    def __init__(self, config: QuaRotConfig, context: ProcessorContext) -> None:
        if context.structure.rotation is None:
            raise UnsupportedError(f"quarot: adapter {context.adapter_name} does not describe where to rotate "
                                   f"(ModelStructure.rotation, the QuaRot interface)")
        if context.attention is None:
            raise UnsupportedError(f"quarot: adapter {context.adapter_name} gives no attention shape")
        self.config = config
        self.context = context
        self.structure = context.structure.rotation
        self.q: torch.Tensor | None = None
        self.head_q: torch.Tensor | None = None

    @property
    def needs_calibration(self) -> bool:
        return False

    def claims(self, linear_names: list[str]) -> dict[str, str]:
        return {}

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
        self.head_q = random_rotation(self.context.attention.head_dim, self.config.seed + 1)[0].float()
        if lm_head.weight.data_ptr() == embedding.weight.data_ptr():  # tied: give lm_head its own table
            lm_head.weight = nn.Parameter(lm_head.weight.detach().clone(), requires_grad=False)
        rotate.fold_norm_into_readers(_rms_norm(model.get_submodule(s.final_norm), s.final_norm), [lm_head])
        rotate.rotate_reader(lm_head, self.q)
        rotate.rotate_embedding(embedding, self.q)

    def before_forward(self, block_name: str, block: nn.Module) -> None:
        if self.q is None:
            raise ProcessingError("quarot: prepare_model was not called before the first block")

    def after_forward(self, block_name: str, block: nn.Module) -> None:
        s = self.structure
        names = [n for _, readers in s.norm_readers for n in readers] + list(s.writers) + [s.value, s.output]
        if not all(type(block.get_submodule(n)) is nn.Linear for n in names):
            raise ProcessingError(f"quarot: {block_name} is already quantized; put quarot first in spec.process")
        for norm_name, reader_names in s.norm_readers:
            readers = [block.get_submodule(n) for n in reader_names]
            rotate.fold_norm_into_readers(_rms_norm(block.get_submodule(norm_name), f"{block_name}.{norm_name}"),
                                          readers)
            for linear in readers:
                rotate.rotate_reader(linear, self.q)
        for name in s.writers:
            rotate.rotate_writer(block.get_submodule(name), self.q)
        shape = self.context.attention
        rotate.rotate_heads(block.get_submodule(s.value), block.get_submodule(s.output), self.head_q,
                            shape.num_heads, shape.num_kv_heads)

    def output_edits(self) -> OutputEdits:
        edits = OutputEdits(config={"tie_word_embeddings": False})
        if self.config.export_extra_info and self.q is not None:
            edits.files[ROTATION_FILE] = {"global_rotation": self.q.contiguous()}
            edits.optional["quarot"] = {"rotation_map": {"global_rotation": ROTATION_FILE}}
        return edits
