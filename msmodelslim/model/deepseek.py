"""DeepSeek-architecture families beyond DeepSeek-V3: DeepSeek-V3.2 (MLA plus the sparse-attention indexer) and
Kimi-K2 (DeepSeek-V3's architecture under its own model_type). DeepSeek-V4 is another architecture: model/deepseek_v4.py.

Each is DeepSeek-V3's structure (`DeepseekV3Adapter`: MLA, dense first layers, shared plus routed experts,
block-FP8 checkpoints dequantized on load), so the smoothing and rotation structures described there apply.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from msmodelslim.core.errors import UnsupportedError
from msmodelslim.core.logging import get_logger
from msmodelslim.format.edits import OutputEdits
from msmodelslim.model.checkpoint import read_json
from msmodelslim.model.families import DeepseekV3Adapter
from msmodelslim.model.hf_config import model_load_errors
from msmodelslim.model.interface import ModelStructure
from msmodelslim.model.skeleton_edits import keep_float, normalized_hadamard

log = get_logger("model.deepseek")

# ---- the sparse-attention (DSA) indexer: DeepSeek-V3.2 and GLM-5 -------------------------------------------------
INDEXER = "self_attn.indexer"
# Read the block's normed input (input_layernorm), like q_a_proj; vLLM fuses them (wk_weights_proj) and builds
# them without quantization (quant_config=None), so they always stay float.
INDEXER_HIDDEN_READERS = (f"{INDEXER}.wk", f"{INDEXER}.weights_proj")
# Reads the query latent (q_a_layernorm's output), like q_b_proj; quantizable (GLM-5's practices quantize it).
INDEXER_Q_READERS = (f"{INDEXER}.wq_b",)
INDEXER_QUANT_TYPE = "INT8_DYNAMIC"  # formats.md A.6: the engine's dynamic int8 lightning-indexer scheme
ROTATIONS = ("q_rot", "k_rot")


def with_indexer_readers(structure: ModelStructure) -> ModelStructure:
    """`structure` with the indexer's projections added wherever the MLA projections reading the same tensor are
    listed: next to q_a_proj (input norm) and next to q_b_proj (q_a_layernorm). Smoothing and offline rotation
    then scale or rotate the indexer's inputs with the attention's, which keeps the indexer's scores exact."""

    def extend(names: tuple[str, ...]) -> tuple[str, ...]:
        extra = (INDEXER_HIDDEN_READERS if "self_attn.q_a_proj" in names else ()) + \
                (INDEXER_Q_READERS if "self_attn.q_b_proj" in names else ())
        return tuple(names) + tuple(e for e in extra if e not in names)

    smooth = tuple(replace(g, targets=extend(g.targets)) if g.kind == "norm-linear" else g
                   for g in structure.smooth_subgraphs)
    rotation = structure.rotation
    if rotation is not None:
        rotation = replace(rotation, norm_readers=tuple((norm, extend(r)) for norm, r in rotation.norm_readers))
    return replace(structure, smooth_subgraphs=smooth, rotation=rotation)


class SparseIndexerMixin:
    """The DeepSeek sparse-attention indexer (DeepSeek-V3.2, GLM-5) in the ascendv1 output (formats.md A.6).

    - `<attn>.indexer.quant_type: "INT8_DYNAMIC"` for every layer, plus the global `indexer_quant_type`: the
      engine's lightning indexer may then run on per-token int8 query/key (vLLM-Ascend `enable_sparse_li_c8`);
      it needs no calibration.
    - `<attn>.indexer.q_rot` and `.k_rot`, float32 [index_head_dim, index_head_dim]: the rotation applied to the
      indexer's query and key before they are quantized. One orthogonal matrix for both keeps q·k exact; it is
      H/√d (Sylvester Hadamard), the rotation DeepSeek's reference indexer applies. They are buffers of the
      indexer module, generated (not read from the checkpoint) and written FLOAT in float32.
    - wk and weights_proj stay float (the engine builds them without quantization); wq_b may be quantized.
    """

    def _check_indexer(self) -> None:
        size = getattr(self.config, "index_head_dim", None)
        if not isinstance(size, int) or size < 1 or size & (size - 1):
            raise UnsupportedError(f"{self.model_path}/config.json: index_head_dim {size!r} is not a power of two; "
                                   f"the indexer's q_rot/k_rot Hadamard rotation needs one")

    def prepare_skeleton(self, model: nn.Module) -> None:
        super().prepare_skeleton(model)
        keep_float(model, [f"*.{n}" for n in INDEXER_HIDDEN_READERS])
        rotation = normalized_hadamard(self.config.index_head_dim)
        for name, module in model.named_modules():
            if name.endswith(f".{INDEXER}"):
                for buffer in ROTATIONS:
                    module.register_buffer(buffer, rotation.clone(), persistent=True)

    def _generated(self, name: str) -> bool:
        return name.rpartition(".")[0].endswith(f".{INDEXER}") and name.rpartition(".")[2] in ROTATIONS

    def _materialise(self, root: nn.Module, prefix: str, names: list[str], device: torch.device,
                     as_stored: bool = False) -> None:
        generated = [n for n in names if self._generated(n)]
        super()._materialise(root, prefix, [n for n in names if not self._generated(n)], device, as_stored)
        rotation = normalized_hadamard(self.config.index_head_dim).to(device)
        for name in generated:  # the skeleton's values; after a release to meta they are made again
            owner, _, buffer = name[len(prefix):].rpartition(".")
            root.get_submodule(owner).register_buffer(buffer, rotation.clone(), persistent=True)

    def original_dtype(self, tensor_name: str) -> torch.dtype:
        return torch.float32 if self._generated(tensor_name) else super().original_dtype(tensor_name)

    def output_edits(self) -> OutputEdits:
        layers = range(self.config.num_hidden_layers)
        entries = {f"{self.structure.decoder_layers}.{i}.{INDEXER}.quant_type": INDEXER_QUANT_TYPE for i in layers}
        return super().output_edits().merge(OutputEdits(description={**entries, "indexer_quant_type": INDEXER_QUANT_TYPE}))


class DeepseekV32Adapter(SparseIndexerMixin, DeepseekV3Adapter):
    """DeepSeek-V3.2-Exp / DeepSeek-V3.2 (deepseek_v32): DeepSeek-V3's MLA and MoE plus the sparse-attention
    indexer (wq_b on the query latent; wk, k_norm, weights_proj on the normed input), see SparseIndexerMixin."""

    structure = with_indexer_readers(replace(DeepseekV3Adapter.structure, hf_model_types=("deepseek_v32",)))

    def __init__(self, model_type: str, model_path, trust_remote_code: bool = False) -> None:
        super().__init__(model_type, model_path, trust_remote_code)
        self._check_indexer()


# ---- Kimi-K2 ----------------------------------------------------------------------------------------------------
class KimiK2Adapter(DeepseekV3Adapter):
    """Kimi-K2-Instruct-0905 / Kimi-K2-Thinking: DeepSeek-V3's architecture. Their config.json says model_type
    `kimi_k2` and points `auto_map` at the checkpoint's own Python code; config.json is read here as data into
    transformers' DeepseekV3Config (auto_map dropped), so the model is always transformers' DeepseekV3 and the
    checkpoint's code never runs (its tokenizer is code too: calibration needs --trust_remote_code True for it).
    Kimi-K2-Instruct ships block-FP8 weights, Kimi-K2-Thinking compressed-tensors int4 experts: both are
    dequantized on load (model/checkpoint.py, model/packed_checkpoint.py)."""

    structure = replace(DeepseekV3Adapter.structure, hf_model_types=("kimi_k2",))

    def __init__(self, model_type: str, model_path, trust_remote_code: bool = False) -> None:
        super().__init__(model_type, model_path, trust_remote_code)
        tokenizer_config = self.model_path / "tokenizer_config.json"
        if not trust_remote_code and tokenizer_config.is_file() and "auto_map" in read_json(tokenizer_config):
            log.warning("%s: the tokenizer is the checkpoint's own code (tokenizer_config.json auto_map); recipes "
                        "that need calibration data fail without --trust_remote_code True (data-free ones, such as "
                        "dynamic W8A8, do not tokenize)", self.model_path)

    def read_config(self) -> Any:
        from transformers import DeepseekV3Config

        config_file = self.model_path / "config.json"
        data = {k: v for k, v in read_json(config_file).items() if k != "auto_map"}
        with model_load_errors(self.model_path, f"{config_file} is not a DeepSeek-V3 config (fix it)"):
            return DeepseekV3Config.from_dict(data)
