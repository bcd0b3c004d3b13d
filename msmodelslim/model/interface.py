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


@dataclass(frozen=True)
class SmoothSubgraph:
    """A source whose output feeds only `targets`' inputs, so a per-channel scale can move between them.

    kind: "norm-linear" (a norm's weight feeds several linears), "ov" (v_proj rows feed o_proj's columns
    through attention, grouped by key/value head), "up-down" (up_proj rows feed down_proj's columns through
    the gated activation), "linear-linear" (a linear feeds another directly). Names are relative to a block.
    """

    kind: str
    source: str
    targets: tuple[str, ...]


LLAMA_SMOOTH_SUBGRAPHS = (
    SmoothSubgraph("norm-linear", "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    SmoothSubgraph("norm-linear", "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    SmoothSubgraph("ov", "self_attn.v_proj", ("self_attn.o_proj",)),
    SmoothSubgraph("up-down", "mlp.up_proj", ("mlp.down_proj",)),
)


@dataclass(frozen=True)
class RotationStructure:
    """Where an offline rotation of the residual stream (QuaRot) applies.

    embedding, final_norm and lm_head are full module names; the others are relative to a decoder block.
    norm_readers: each RMSNorm inside a block with the linears that read its output (the norm's weight is
    folded into them); writers: the linears whose output is added to the residual stream; value/output: the
    v_proj/o_proj pair that also gets a per-head rotation.
    """

    norm_readers: tuple[tuple[str, tuple[str, ...]], ...]
    writers: tuple[str, ...]
    value: str
    output: str
    embedding: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"


LLAMA_ROTATION = RotationStructure(
    norm_readers=(("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                  ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))),
    writers=("self_attn.o_proj", "mlp.down_proj"),
    value="self_attn.v_proj",
    output="self_attn.o_proj",
)


@dataclass(frozen=True)
class AttentionShape:
    num_heads: int
    num_kv_heads: int
    head_dim: int


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
    # Where QuaRot rotates; None = the adapter does not support rotations.
    rotation: RotationStructure | None = None


class ModelSlimPipelineInterfaceV1(ABC):
    @abstractmethod
    def handle_dataset(self, dataset: list[str], device: torch.device) -> list[dict[str, torch.Tensor]]:
        """Tokenize calibration texts into model input batches."""

    @abstractmethod
    def init_model(self, device: torch.device, load_layers: bool) -> nn.Module:
        """Build the model; with load_layers=False only the non-block weights are materialised."""

    def prefetch_block(self, model: nn.Module, block_name: str) -> None:
        """Hint that `block_name` is loaded next (layer_wise reads overlap work); nothing by default."""

    def init_skeleton(self) -> nn.Module:
        """The model's modules with no weight read, enough to plan (dry runs, the launcher of several ranks).
        Override to skip the read; by default it builds the model as layer_wise does."""
        return self.init_model(torch.device("cpu"), load_layers=False)

    def load_weights(self, skeleton: nn.Module, device: torch.device, load_layers: bool) -> nn.Module:
        """The planned skeleton with its weights read (what init_model returns). By default the model is built
        again; adapters that can fill the skeleton in place override this."""
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
