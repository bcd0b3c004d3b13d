"""`TransformersModel`: the default adapter behaviour for Hugging Face decoder-only models.

Loading is local only (`local_files_only=True`) and never runs checkpoint code unless the user passed
`--trust_remote_code True`. Weights are read from the safetensors shards on demand, so a layer-wise run holds
one decoder block (plus embeddings and head) in memory at a time.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Generator, Iterator, Optional

import torch
from accelerate import init_empty_weights
from torch import nn

from msmodelslim.core.errors import InvalidModelError
from msmodelslim.core.logging import get_logger
from msmodelslim.core.memory import empty_on_huge_pages
from msmodelslim.format.edits import OutputEdits
from msmodelslim.model.checkpoint import SafetensorsCheckpoint, fp8_block_size
from msmodelslim.model.forward_capture import forward_until, to_device
from msmodelslim.quantizer.primitives import all_finite, one_thread
from msmodelslim.model.hf_config import load_hf_config, model_load_errors, require_local_dir
from msmodelslim.model.interface import (
    AttentionShape,
    MlaShape,
    ModelSlimPipelineInterfaceV1,
    ModelStructure,
    ProcessRequest,
    block_hidden_state,
)
from msmodelslim.model.moe import StackedSlice, stacked_source
from msmodelslim.model.packed_checkpoint import open_checkpoint
from msmodelslim.model.passthrough import UnreadTensors, classify_unread

log = get_logger("model")

MAX_CALIB_TOKENS = 2048  # longer calibration samples are truncated (memory is proportional to length)
MAX_CALIB_BATCH = 16  # samples of equal length share a forward


# The dtypes `as_stored` loading keeps: every value widens to float32 exactly, so whatever is computed from a
# float32 copy (min/max, codes) comes out the same when each piece is widened as it is used.
STORED_HALF_DTYPES = (torch.bfloat16, torch.float16)


def _float32(t: torch.Tensor) -> torch.Tensor:
    # Calibration and quantization run in float32: exact for bf16/fp16 weights and more accurate.
    if not t.is_floating_point() or t.dtype == torch.float32:
        return t
    if t.device.type != "cpu":
        return t.float()
    # The values of t.float(), into memory faulted in by 2 MiB pages, on one thread (a memory-bound pass that a
    # second thread slows down on a busy machine): core/memory.py empty_on_huge_pages has the measurements.
    with one_thread():
        return empty_on_huge_pages(t.shape, torch.float32).copy_(t)


def config_dtype(config) -> torch.dtype:
    """The dtype a Hugging Face config declares (`dtype`, formerly `torch_dtype`); float32 when it has none.
    transformers 5 reads a legacy `torch_dtype` key into `dtype` and warns on every read of `torch_dtype`, so the
    old name is read only from a config object without `dtype`."""
    dtype = config.dtype if hasattr(config, "dtype") else getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


class TransformersModel(ModelSlimPipelineInterfaceV1):
    structure = ModelStructure()
    attn_implementation = "sdpa"  # transformers' attention kernel for calibration forwards

    def __init__(self, model_type: str, model_path: str | Path, trust_remote_code: bool = False) -> None:
        self.model_type = model_type
        self.model_path = require_local_dir(model_path, "--model_path")
        self.trust_remote_code = trust_remote_code
        self.config = self.read_config()
        families = self.structure.hf_model_types
        if families and self.config.model_type not in families:
            raise InvalidModelError(
                f"--model_type {model_type} expects a checkpoint of type {'/'.join(families)}, but "
                f"{self.model_path}/config.json says {self.config.model_type!r}; pick the matching --model_type"
            )
        self._checkpoint: Optional[SafetensorsCheckpoint] = None  # opened on first use (`checkpoint`)
        self._headers: Optional[SafetensorsCheckpoint] = None  # the headers alone (`stored_names`)
        self._fp8_block = fp8_block_size(self.config)
        self._tokenizer = None
        # Read now: building the float32 working model rewrites config.dtype.
        self._global_dtype = config_dtype(self.config)

    def read_config(self) -> Any:
        """The model's config from config.json (no checkpoint code unless trusted). Families whose config.json
        names a model_type transformers lacks, but whose architecture it has, override this (Kimi-K2)."""
        return load_hf_config(self.model_path, self.trust_remote_code)

    def stacked_source(self, name: str) -> StackedSlice | None:
        """Where per-expert weight `name` lives in a checkpoint that stacks experts: transformers' layout
        (`experts.gate_up_proj` / `experts.down_proj`) by default; families that stack differently override."""
        return stacked_source(name)

    def output_edits(self) -> OutputEdits:
        """What the family adds to the written checkpoint besides its tensors (e.g. description entries the engine
        reads for the DeepSeek-V3.2 indexer); nothing by default."""
        return OutputEdits()

    # ---- information -------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(
                    self.model_path, trust_remote_code=self.trust_remote_code, local_files_only=True
                )
            except (OSError, ValueError) as exc:
                raise InvalidModelError(f"cannot load the tokenizer from {self.model_path}: {exc}") from None
        return self._tokenizer

    def global_dtype(self) -> torch.dtype:
        """The dtype the serving engine will run in (decides the ascendv1 deq_scale encoding)."""
        return self._global_dtype

    def attention_shape(self) -> AttentionShape | None:
        """Heads and head size for the attention-aware algorithms ('ov' smoothing, QuaRot); None when the
        attention is not grouped-query multi-head (e.g. MLA)."""
        c = self.config
        heads = c.num_attention_heads
        return AttentionShape(heads, getattr(c, "num_key_value_heads", None) or heads,
                              getattr(c, "head_dim", None) or c.hidden_size // heads)

    def mla_shape(self) -> MlaShape | None:
        """Heads and per-head sizes of multi-head latent attention, read from config.json (DeepSeek-V2/V3
        names: kv_lora_rank, qk_nope_head_dim, v_head_dim); None for other attention."""
        c = self.config
        if not all(isinstance(getattr(c, k, None), int) for k in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim")):
            return None
        return MlaShape(c.num_attention_heads, c.qk_nope_head_dim, c.v_head_dim)

    def block_names(self, model: nn.Module) -> list[str]:
        layers = model.get_submodule(self.structure.decoder_layers)
        return [f"{self.structure.decoder_layers}.{i}" for i in range(len(layers))]

    def original_dtype(self, tensor_name: str) -> torch.dtype:
        source = self.stacked_source(tensor_name)
        stacked = self.checkpoint.original_dtype(source.tensor) if source is not None else None
        return self.checkpoint.original_dtype(tensor_name) or stacked or self.global_dtype()

    # ---- data --------------------------------------------------------------------------------------------
    def handle_dataset(self, dataset: list[str], device: torch.device) -> list[dict[str, torch.Tensor]]:
        """Tokenize each text (truncated to MAX_CALIB_TOKENS); batch samples of equal length without padding."""
        by_length: dict[int, list[torch.Tensor]] = {}
        for text in dataset:
            ids = self.tokenizer(text, return_tensors="pt", truncation=True, max_length=MAX_CALIB_TOKENS)["input_ids"][0]
            if len(ids):
                by_length.setdefault(len(ids), []).append(ids)
        batches = []
        for length in sorted(by_length):
            rows = by_length[length]
            for start in range(0, len(rows), MAX_CALIB_BATCH):
                batches.append({"input_ids": torch.stack(rows[start : start + MAX_CALIB_BATCH]).to(device)})
        return batches

    @property
    def checkpoint(self) -> SafetensorsCheckpoint:
        """The source checkpoint's tensors (int4 pack-quantized ones unpacked on load), opened on first use: a reader
        that only builds the skeleton of a written output (model/rebuild.py) never opens that output as a source."""
        if self._checkpoint is None:
            self._checkpoint = open_checkpoint(self.model_path, self.config)
        return self._checkpoint

    @checkpoint.setter
    def checkpoint(self, reader: SafetensorsCheckpoint) -> None:
        self._checkpoint = reader

    def stored_names(self) -> list[str]:
        """The checkpoint's tensor names from its headers, without opening it as a quantization source: what a
        constructor reads to tell a layout, so that the skeleton of a written output (model/rebuild.py) builds."""
        if self._checkpoint is not None:
            return self._checkpoint.names()
        if self._headers is None:
            self._headers = SafetensorsCheckpoint(self.model_path)
        return self._headers.names()

    def open_source(self) -> None:
        """Open the checkpoint as the source to quantize now (model/registry.py create_adapter): a quantization_config
        this package cannot unpack is refused before any weight is read."""
        _ = self.checkpoint

    # ---- model -------------------------------------------------------------------------------------------
    def init_skeleton(self) -> nn.Module:
        """The model on the meta device, reshaped as the checkpoint (fused experts split); nothing is read."""
        from transformers import AutoModelForCausalLM

        with model_load_errors(self.model_path), init_empty_weights():  # e.g. sizes torch cannot allocate
            model = AutoModelForCausalLM.from_config(
                self.config, trust_remote_code=self.trust_remote_code, attn_implementation=self.attn_implementation,
                dtype=torch.float32
            )
        model.eval()
        if getattr(self.config, "tie_word_embeddings", False):
            model.tie_weights()  # one object under two names, as in the loaded model (the plan and writers rely on it)
        self.prepare_skeleton(model)
        self.enable_kv_cache(model, False)
        return model

    def unused_checkpoint_tensors(self, model: nn.Module) -> list[str]:
        """Checkpoint tensors that no parameter of the model built from config.json reads as such (e.g. a
        multi-token-prediction layer beyond num_hidden_layers, block-FP8 scales); see `unread_tensors`."""
        state = list(model.state_dict())
        used = set(state) | {source.tensor for n in state if (source := self.stacked_source(n)) is not None}
        return sorted(set(self.checkpoint.names()) - used)

    def unread_tensors(self, model: nn.Module) -> UnreadTensors:
        """What becomes of the unused checkpoint tensors: written through unchanged (grouped, e.g. one MTP layer)
        or consumed for a documented reason (model/passthrough.py). Names and headers only, nothing is read."""
        names = self.checkpoint.names()
        return classify_unread(self.unused_checkpoint_tensors(model), set(names),
                               {n: self.checkpoint.stored_dtype(n) for n in names}, self.structure.decoder_layers,
                               len(self.block_names(model)), str(self.model_path))

    def read_unread(self, name: str) -> torch.Tensor:
        """One pass-through tensor as stored; a block-FP8 weight comes back dequantized (float32)."""
        return self.checkpoint.load([name], self._fp8_block)[name]

    def init_model(self, device: torch.device, load_layers: bool) -> nn.Module:
        return self.load_weights(self.init_skeleton(), device, load_layers)

    def load_weights(self, model: nn.Module, device: torch.device, load_layers: bool,
                     defer_output_head: bool = False) -> nn.Module:
        blocks = self.block_names(model)
        names = [n for n in model.state_dict() if load_layers or not any(n.startswith(b + ".") for b in blocks)]
        if defer_output_head:  # a large vocabulary's float32 head would sit unused beside every block
            deferred = set(self._untied_head_names(model))
            names = [n for n in names if n not in deferred]
        self._materialise(model, "", names, torch.device("cpu"))
        return model

    def _untied_head_names(self, model: nn.Module) -> list[str]:
        """State-dict names of the output head's parameters when it has its own table (not tied to the input
        embedding); [] for a tied head or a model without one."""
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is None or getattr(self.config, "tie_word_embeddings", False):
            return []
        prefix = next((name for name, module in model.named_modules() if module is head), None)
        if prefix is None:
            return []
        return [f"{prefix}.{leaf}" for leaf, _ in head.named_parameters()]

    def prepare_skeleton(self, model: nn.Module) -> None:
        """Reshape the freshly built (meta-device) model before any weight is loaded, so that its state-dict
        names are the checkpoint's. Nothing by default; MoE adapters split fused experts here."""

    def _materialise(self, root: nn.Module, prefix: str, names: list[str], device: torch.device,
                     as_stored: bool = False) -> None:
        """Load `names` (full tensor names) from the checkpoint into `root` (which lives at `prefix`).

        A per-expert weight the checkpoint lacks is cut from the layer's stacked expert tensor when there is one.
        `as_stored`: bf16/fp16 tensors keep their dtype instead of being widened to float32 (see `load_block`).
        """
        available = set(self.checkpoint.names())
        absent = [n for n in names if n not in available]
        stacked = {n: s for n in absent if (s := self.stacked_source(n)) is not None and s.tensor in available}
        tie = getattr(self.config, "tie_word_embeddings", False)
        missing_for_real = [n for n in absent if n not in stacked and not (tie and n.endswith("lm_head.weight"))]
        if missing_for_real:
            raise InvalidModelError(f"the checkpoint in {self.model_path} lacks {sorted(missing_for_real)[:5]}")
        loaded = self.checkpoint.load([n for n in names if n in available], self._fp8_block)
        loaded.update(self._unstack(root, prefix, stacked))
        expected = root.state_dict()  # still on the meta device: the shapes and dtypes config.json implies
        state = {}
        for name in list(loaded):  # widen one tensor at a time, dropping its checkpoint-dtype copy as we go
            tensor = loaded.pop(name)
            self._check_tensor(name, tensor, expected.get(name[len(prefix) :]))
            kept = as_stored and tensor.dtype in STORED_HALF_DTYPES
            state[name[len(prefix) :]] = (tensor if kept else _float32(tensor)).to(device)
        root.load_state_dict(state, strict=False, assign=True)
        if tie and len(absent) > len(stacked):
            root.tie_weights()

    def _check_tensor(self, name: str, tensor: torch.Tensor, expected: torch.Tensor | None) -> None:
        """Refuse a weight that cannot belong to the model config.json describes, or that holds NaN/Inf (every
        scale computed from it would be NaN): caught per tensor, before anything of its block is written."""
        where = f"{self.model_path}: tensor {name} in {self.checkpoint.file_of(name) or 'a stacked expert tensor'}"
        if expected is not None and expected.is_floating_point() and not tensor.is_floating_point():
            raise InvalidModelError(f"{where} is {tensor.dtype}, expected a floating-point weight ({expected.dtype}); "
                                    f"msmodelslim quantizes float checkpoints (is this one already quantized?)")
        if expected is not None and tensor.shape != expected.shape:
            raise InvalidModelError(f"{where} has shape {list(tensor.shape)}, expected {list(expected.shape)} from "
                                    f"config.json; the weights and config.json do not belong to the same model")
        if tensor.is_floating_point() and not all_finite(tensor):
            raise InvalidModelError(f"{where} holds NaN/Inf values; the checkpoint is damaged and cannot be "
                                    f"quantized (nothing was written)")

    def _unstack(self, root: nn.Module, prefix: str, slices: dict[str, StackedSlice]) -> dict[str, torch.Tensor]:
        """Per-expert weights cut from stacked expert tensors ([E, 2I, H] gate rows then up rows; [E, H, I])."""
        if not slices:
            return {}
        stacked = self.checkpoint.load(sorted({s.tensor for s in slices.values()}), self._fp8_block)
        shapes = {k: v.shape for k, v in root.state_dict().items()}
        out = {}
        for name, where in slices.items():
            tensor = where.take(stacked[where.tensor])
            expected = shapes[name[len(prefix) :]]
            if tensor.shape != expected:
                raise InvalidModelError(
                    f"{self.model_path}: stacked expert tensor {where.tensor} {list(stacked[where.tensor].shape)} "
                    f"does not give {name} its shape {list(expected)}; expected gate_up_proj [E, 2I, H] (gate rows "
                    f"then up rows) and down_proj [E, H, I]"
                )
            out[name] = tensor
        return out

    def load_block(self, model: nn.Module, block_name: str, device: torch.device, as_stored: bool = False) -> nn.Module:
        """Read the block's weights, widened to float32 for calibration and quantization. With `as_stored`, bf16
        and fp16 weights stay in the checkpoint's dtype: for a run whose processors only quantize and write them
        (`takes_stored_weights`), which gives the same codes without a float32 copy of the whole block."""
        block = model.get_submodule(block_name)
        names = [f"{block_name}.{n}" for n in block.state_dict()]
        self._materialise(block, block_name + ".", names, device, as_stored)
        return block

    def prefetch_block(self, model: nn.Module, block_name: str) -> None:
        block = model.get_submodule(block_name)
        self.checkpoint.prefetch([f"{block_name}.{n}" for n in block.state_dict()])

    def prefetch_outside(self, model: nn.Module, names: list[str]) -> None:
        self.checkpoint.prefetch(names)  # a tied head has no tensor of its own: skipped

    def release_outside(self, model: nn.Module, block_names: list[str]) -> bool:
        """Every non-block parameter (each name of a tied pair) to the meta device; buffers stay (small, and some
        are computed rather than read)."""
        for name, param in list(model.named_parameters(remove_duplicate=False)):
            if param.device.type == "meta" or any(name.startswith(b + ".") for b in block_names):
                continue
            owner, _, leaf = name.rpartition(".")
            module = model.get_submodule(owner)
            module._parameters[leaf] = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        return True

    def load_outside(self, model: nn.Module, names: list[str], as_stored: bool = False) -> None:
        self._materialise(model, "", names, torch.device("cpu"), as_stored)

    def release_block(self, model: nn.Module, block_name: str) -> None:
        """Drop a processed block's tensors (back to the meta device) so memory stays bounded by one block."""
        model.get_submodule(block_name).to("meta")

    def generate_model_visit(self, model: nn.Module) -> Iterator[ProcessRequest]:
        for name in self.block_names(model):
            yield ProcessRequest(name, model.get_submodule(name))

    def capture_first_block_inputs(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[tuple, dict]:
        """Run the model's own forward up to the first block: embeddings, masks and position encodings come
        out exactly as the model computes them, for any family."""
        first = model.get_submodule(self.block_names(model)[0])
        args, kwargs, _ = forward_until(model, first, {k: v.to("cpu") for k, v in batch.items()})
        return args, kwargs

    def generate_model_forward(
        self, model: nn.Module, inputs: dict[str, torch.Tensor]
    ) -> Generator[ProcessRequest, Any, None]:
        args, kwargs = self.capture_first_block_inputs(model, inputs)
        device = inputs["input_ids"].device
        args, kwargs = to_device(args, device), to_device(kwargs, device)
        for name in self.block_names(model):
            output = yield ProcessRequest(name, model.get_submodule(name), args, kwargs)
            args = (block_hidden_state(output),) + tuple(args[1:])

    def enable_kv_cache(self, model: nn.Module, need_kv_cache: bool) -> None:
        model.config.use_cache = need_kv_cache
