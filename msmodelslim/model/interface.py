"""The interface hub: what the runners ask of a model adapter (`ModelSlimPipelineInterfaceV1`).

Third parties add a model by implementing this interface (usually by subclassing `TransformersModel`) and
registering the class under the entry-point group `msmodelslim.model_adapters`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Generator, Iterator

import torch
from torch import nn

from msmodelslim.model.rotation import LLAMA_ROTATION, RotationStructure  # noqa: F401  (re-exported)
from msmodelslim.model.kv_cache import KvCacheStructure


def ends_with_parts(name: str, suffixes: tuple[str, ...]) -> bool:
    """Whether a module name ends with one of the dotted suffixes, whole name parts only ("o_proj" matches
    "layers.0.self_attn.o_proj", "to_out.0" matches "blocks.3.attn1.to_out.0", "proj" matches neither)."""
    return any(name == suffix or name.endswith("." + suffix) for suffix in suffixes)


@dataclass
class ProcessRequest:
    """One block to process: its full module name, the module, and (for a forward) its inputs."""

    name: str
    module: nn.Module
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


def block_hidden_state(output: Any) -> torch.Tensor:
    """The hidden states a block's forward returns (decoder layers return them alone or first in a tuple);
    they become args[0] of the next block's request."""
    return output[0] if isinstance(output, tuple) else output


EVERY_EXPERT = "*"  # in a SmoothSubgraph name: every routed expert index of the block
OPTIONAL = "?"  # ending a SmoothSubgraph target: read only in blocks that have it (DeepSeek-V4's compressor)


@dataclass(frozen=True)
class SmoothSubgraph:
    """A source whose output feeds only `targets`' inputs, so a per-channel scale can move between them.

    kind: "norm-linear" (a norm's weight feeds several linears), "ov" (the value rows of v_proj, or of MLA's
    kv_b_proj, feed o_proj's columns through attention, grouped by key/value head), "up-down" (up_proj rows
    feed down_proj's columns through the gated activation), "linear-linear" (a linear feeds another
    directly). Names are relative to a block. Targets are linears, or a router whose forward is
    F.linear(x, weight) (its columns take the same scale, so routing is unchanged).

    A `*` in a name stands for every routed expert index of the block (`mlp.experts.*.up_proj`): in targets
    only, the subgraph is ONE subgraph over all experts (a norm feeding every expert); in the source, it is
    one subgraph per expert (each expert's up -> down). A subgraph whose modules a block lacks is skipped in
    that block, so one structure can describe dense and MoE layers, or alternatives (q_proj or q_a_proj). A target
    ending in `?` is optional: it joins the subgraph in the blocks that have it, and is left out elsewhere.
    layout ("ov" only): "gqa", the source is v_proj ([num_kv_heads, head_dim] rows, AttentionShape); "mla", the
    source is kv_b_proj ([qk_nope_head_dim key rows; v_head_dim value rows] per head, MlaShape).
    """

    kind: str
    source: str
    targets: tuple[str, ...]
    layout: str = "gqa"


def _in(parent: str, name: str) -> str:
    return f"{parent}.{name}" if parent else name


def gqa_attention_subgraphs(norm: str = "input_layernorm", attn: str = "self_attn",
                            readers: tuple[str, ...] = ("q_proj", "k_proj", "v_proj"), value: str | None = "v_proj",
                            output: str = "o_proj") -> tuple[SmoothSubgraph, ...]:
    """Multi-head / grouped-query attention: the norm feeds every reader (q/k/v, one scale: the engine fuses
    them); the value rows feed o_proj (none when `value` is None, e.g. a fused qkv_proj)."""
    graphs = [SmoothSubgraph("norm-linear", norm, tuple(_in(attn, r) for r in readers))]
    if value is not None:
        graphs.append(SmoothSubgraph("ov", _in(attn, value), (_in(attn, output),)))
    return tuple(graphs)


def mla_attention_subgraphs(norm: str = "input_layernorm", attn: str = "self_attn", q_a: str = "q_a_proj",
                            q_a_norm: str = "q_a_layernorm", q_b: str = "q_b_proj", q: str = "q_proj",
                            kv_a: str = "kv_a_proj_with_mqa", kv_a_norm: str = "kv_a_layernorm",
                            kv_b: str = "kv_b_proj", output: str = "o_proj", extra_readers: tuple[str, ...] = (),
                            extra_q_readers: tuple[str, ...] = ()) -> tuple[SmoothSubgraph, ...]:
    """Multi-head latent attention (DeepSeek-V2/V3): the norm feeds q_a_proj and kv_a_proj_with_mqa (one scale:
    vLLM fuses them into fused_qkv_a_proj), or q_proj when there is no query LoRA; q_a_layernorm feeds q_b_proj;
    kv_a_layernorm (over the first kv_lora_rank outputs of kv_a_proj_with_mqa; the rope part bypasses it) feeds
    kv_b_proj; kv_b_proj's value rows feed o_proj ("ov", laid out by MlaShape: each head's key rows keep
    scale 1). extra_readers / extra_q_readers: other modules of the block that read the input norm / q_a_layernorm
    output (names relative to the block), e.g. a sparse-attention indexer's projections."""
    extra, extra_q = tuple(extra_readers), tuple(extra_q_readers)
    return (
        SmoothSubgraph("norm-linear", norm, (_in(attn, q_a), _in(attn, kv_a)) + extra),
        SmoothSubgraph("norm-linear", norm, (_in(attn, q), _in(attn, kv_a)) + extra),
        SmoothSubgraph("norm-linear", _in(attn, q_a_norm), (_in(attn, q_b),) + extra_q),
        SmoothSubgraph("norm-linear", _in(attn, kv_a_norm), (_in(attn, kv_b),)),
        SmoothSubgraph("ov", _in(attn, kv_b), (_in(attn, output),), layout="mla"),
    )


def dense_mlp_subgraphs(norm: str = "post_attention_layernorm", mlp: str = "mlp", gate: str = "gate_proj",
                        up: str = "up_proj", down: str = "down_proj") -> tuple[SmoothSubgraph, ...]:
    """A gated MLP: the norm feeds gate and up; up's rows feed down's columns."""
    return (SmoothSubgraph("norm-linear", norm, (_in(mlp, gate), _in(mlp, up))),
            SmoothSubgraph("up-down", _in(mlp, up), (_in(mlp, down),)))


def moe_mlp_subgraphs(norm: str = "post_attention_layernorm", mlp: str = "mlp", router: str = "gate",
                      experts: str = "experts", gate: str = "gate_proj", up: str = "up_proj", down: str = "down_proj",
                      shared: str | None = None, shared_gate: str = "gate_proj", shared_up: str = "up_proj",
                      shared_down: str = "down_proj", extra_readers: tuple[str, ...] = ()) -> tuple[SmoothSubgraph, ...]:
    """A mixture-of-experts MLP with routed experts unfused (`<mlp>.<experts>.<e>.<gate|up|down>`): the norm
    feeds the router, every expert's gate/up, the shared expert's gate/up and `extra_readers` (e.g. Qwen3-Next's
    shared_expert_gate), all with ONE scale, so routing is unchanged; each expert's up -> down, and the shared
    expert's. Names other than `norm` are relative to `mlp`."""
    every = _in(_in(mlp, experts), EVERY_EXPERT)
    readers = [_in(mlp, router), _in(every, gate), _in(every, up)]
    graphs = [SmoothSubgraph("up-down", _in(every, up), (_in(every, down),))]
    if shared is not None:
        readers += [_in(_in(mlp, shared), shared_gate), _in(_in(mlp, shared), shared_up)]
        graphs.append(SmoothSubgraph("up-down", _in(_in(mlp, shared), shared_up), (_in(_in(mlp, shared), shared_down),)))
    readers += [_in(mlp, r) for r in extra_readers]
    return (SmoothSubgraph("norm-linear", norm, tuple(readers)), *graphs)


LLAMA_SMOOTH_SUBGRAPHS = gqa_attention_subgraphs() + dense_mlp_subgraphs()


@dataclass(frozen=True)
class AttentionShape:
    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class MlaShape:
    """Multi-head latent attention (DeepSeek-V2/V3 and relatives): kv_b_proj's rows are, per head,
    qk_nope_head_dim key rows then v_head_dim value rows; o_proj reads num_heads heads of v_head_dim."""

    num_heads: int
    qk_nope_head_dim: int
    v_head_dim: int


@dataclass(frozen=True)
class ModelStructure:
    """A family's structure, described once as data for every algorithm and format to read."""

    decoder_layers: str = "model.layers"
    # Linears the serving engine fuses into one matmul: they must share a scheme (and static input scales).
    fused_groups: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
    # Row-parallel linears (input split across tensor-parallel ranks); everything else is column-parallel.
    row_parallel: tuple[str, ...] = ("o_proj", "down_proj")
    hf_model_types: tuple[str, ...] = ()
    # Where smoothing may move scales (SmoothQuant and relatives); empty = the adapter does not support it.
    smooth_subgraphs: tuple[SmoothSubgraph, ...] = ()
    # The residual-stream norms scale by (norm_offset + weight): 1.0 for zero-centred norms (Qwen3-Next), so a
    # smoothing scale divides the effective gain, weight' = (norm_offset + weight) / s - norm_offset.
    norm_offset: float = 0.0
    # Where QuaRot rotates; None = the adapter does not support rotations.
    rotation: RotationStructure | None = None
    # Where K/V are written into the KV cache (C8, kv_smooth); None = not supported (refused by name).
    kv_cache: KvCacheStructure | None = None

    def is_decoder_layer(self, block_name: str) -> bool:
        """Smoothing subgraphs, rotations and the KV cache describe decoder layers; another block (a
        vision-language model's vision tower, processed first) has none of them, only linears to quantize."""
        return block_name.startswith(self.decoder_layers + ".")

    def is_row_parallel(self, linear_name: str) -> bool:
        """Whether the engine splits this linear's input over tensor-parallel ranks (a row_parallel suffix)."""
        return ends_with_parts(linear_name, self.row_parallel)


class ModelSlimPipelineInterfaceV1(ABC):
    @abstractmethod
    def handle_dataset(self, dataset: list[str], device: torch.device) -> list[dict[str, torch.Tensor]]:
        """Tokenize calibration texts into model input batches."""

    @abstractmethod
    def init_model(self, device: torch.device, load_layers: bool) -> nn.Module:
        """Build the model; with load_layers=False only the non-block weights are materialised."""

    def prefetch_block(self, model: nn.Module, block_name: str) -> None:
        """Hint that `block_name` is loaded next (layer_wise reads overlap work); nothing by default."""

    def prefetch_outside(self, model: nn.Module, names: list[str]) -> None:
        """Hint that these non-block tensors (released for the walk) are read back next, to be written; nothing
        by default."""

    def release_outside(self, model: nn.Module, block_names: list[str]) -> bool:
        """Drop the non-block weights (embeddings, head) to the meta device once the calibration batches are
        embedded, so that on large vocabularies they do not sit in memory beside every block; True when dropped,
        and `load_outside` must then bring each back to be written. By default they stay (False)."""
        return False

    def load_outside(self, model: nn.Module, names: list[str], as_stored: bool = False) -> None:
        """Read the non-block tensors `names` back from the checkpoint, as `init_model` first read them (or, with
        `as_stored`, bf16/fp16 ones in the checkpoint's dtype: for tensors that are only written)."""
        raise NotImplementedError(f"{type(self).__name__} does not release its non-block weights")

    def init_skeleton(self) -> nn.Module:
        """The model's modules with no weight read, enough to plan (dry runs, the launcher of several ranks).
        Override to skip the read; by default it builds the model as layer_wise does."""
        return self.init_model(torch.device("cpu"), load_layers=False)

    def load_weights(self, skeleton: nn.Module, device: torch.device, load_layers: bool,
                     defer_output_head: bool = False) -> nn.Module:
        """The planned skeleton with its weights read (what init_model returns). By default the model is built
        again; adapters that can fill the skeleton in place override this. `defer_output_head`: the adapter may
        leave an untied output head unread (on the meta device) for `load_outside` to read when it is needed;
        the block-by-block walk never runs it."""
        return self.init_model(device, load_layers)

    @abstractmethod
    def generate_model_visit(self, model: nn.Module) -> Iterator[ProcessRequest]:
        """Yield each block without data (data-free processing)."""

    @abstractmethod
    def generate_model_forward(
        self, model: nn.Module, inputs: dict[str, torch.Tensor]
    ) -> Generator[ProcessRequest, Any, None]:
        """Yield a request per block with that block's inputs; receive the block's output through send()."""

    @abstractmethod
    def enable_kv_cache(self, model: nn.Module, need_kv_cache: bool) -> None: ...
