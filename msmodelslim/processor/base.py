"""What every processor offers the runner, and the registry that maps YAML `type` names to processors.

The runner walks the decoder blocks in order and, on each block, runs the processors in config order: for
each one `before_forward` (attach observers), the calibration forward over all batches if that processor
`needs_calibration` (so it sees the block as the processors before it left it), then `after_forward`
(smooth, quantize, replace modules). Processors never load weights or touch other blocks; a whole-model
transform changes the non-block modules once, in `prepare_model`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol, Sequence

import torch
from torch import nn

from msmodelslim.format.edits import OutputEdits
from msmodelslim.model.interface import AttentionShape, MlaShape, ModelStructure
from msmodelslim.model.passthrough import PassThroughGroup
from msmodelslim.processor.matching import select
from msmodelslim.quantizer.scheme import LinearQConfig

if TYPE_CHECKING:
    from msmodelslim.core.calibration import BlockInputRanges
    from msmodelslim.core.distributed import Collective

PROCESSORS: dict[str, Callable[..., "Processor"]] = {}


def register_processor(type_name: str):
    def wrap(cls):
        PROCESSORS[type_name] = cls
        return cls

    return wrap


class Processor(ABC):
    # True when after_forward changes what the block's linears receive as input (smoothing, rotations): a processor
    # sharing that block's calibration forward afterwards (inside one `group`) would calibrate on stale activations.
    rewrites_activations: bool = False
    # True when everything this processor collects in a calibration forward is a running min/max (or max |x|)
    # of linear inputs: the runner's convergence test (core/calibration.py) then speaks for its statistics and may
    # end that forward early. Hessians, histograms, means and row samples are not extremes: leave it False.
    range_statistics: bool = False
    # True when prepare_model changes the non-block weights (embeddings, head): the runner then keeps them in
    # memory for the whole walk instead of dropping them and reading them again from the checkpoint to write them.
    changes_outside_blocks: bool = False

    @property
    def takes_stored_weights(self) -> bool:
        """True when this processor reads a block's weights only to quantize or write them, widening each to
        float32 where its method needs that: the runner may then load bf16/fp16 blocks as stored, without a
        float32 copy of every weight (same outputs, byte for byte). Anything that computes with the weights
        (calibration forwards, smoothing, rotations) needs the float32 copy: False by default."""
        return False

    @property
    @abstractmethod
    def needs_calibration(self) -> bool: ...

    @abstractmethod
    def claims(self, linear_names: list[str]) -> dict[str, str]:
        """Which of these linears this processor will rewrite, each mapped to a description of the rule."""

    def prepare_model(self, model: nn.Module) -> None:
        """Called once before any block is visited, with only the non-block modules (embeddings, final norm,
        head) materialised; transforms that span the whole model (rotations) change them here."""

    def check_model(self, model: nn.Module, block_names: list[str]) -> None:
        """Called once while the run is planned, on the model with no weight read (meta device): refuse here
        what cannot work on this model's modules, so the user hears it before any weight is read."""

    def before_forward(self, block_name: str, block: nn.Module) -> None:
        """Called before the block's calibration forward (or visit, for data-free pipelines)."""

    def data_parallel_refusal(self) -> Optional[str]:
        """None when `synchronize` merges everything this processor collects, so dp_layer_wise may run it;
        otherwise why not (the run is refused before any work)."""
        if self.needs_calibration:
            return "it cannot merge its calibration statistics across ranks"
        return None

    def synchronize(self, block_name: str, block: nn.Module, collective: "Collective") -> None:
        """dp_layer_wise: called between the block's calibration forward and `after_forward`; merge what this
        rank collected with the other ranks' so that every rank rewrites the block identically."""

    @abstractmethod
    def after_forward(self, block_name: str, block: nn.Module) -> None:
        """Called after the calibration forward; rewrite the block's modules here."""

    @property
    def uses_reference(self) -> bool:
        """True when some block's calibration needs the float model's inputs beside those of the quantized
        model (GPTAQ, quantizer/gptaq.py): the runner then carries both streams (core/reference.py)."""
        return False

    def needs_reference(self, block_name: str, block: nn.Module) -> bool:
        """Whether this block's calibration forward must be paired with the float block's (`watch_reference`)."""
        return False

    def watch_reference(self, block_name: str, reference_block: nn.Module) -> AbstractContextManager:
        """Hooks, while the context lasts, on `reference_block` (the block still in float, fed the float model's
        inputs) that hand each batch's float-model activations to this processor; the forward of the block itself
        on the same batch follows at once."""
        return nullcontext()

    def ranges_suffice(self, block_name: str, block: nn.Module, ranges: "BlockInputRanges") -> bool:
        """Whether the per-channel min/max of the block's linear inputs, as the block is now, give this processor
        everything its calibration forward would (no side effect). Then the runner calls `calibrate_from_ranges`
        instead of `before_forward` and the forward."""
        return False

    def calibrate_from_ranges(self, block_name: str, block: nn.Module, ranges: "BlockInputRanges") -> None:
        """Take the statistics from `ranges` instead of a forward (only called when `ranges_suffice`)."""
        raise NotImplementedError(f"{type(self).__name__} cannot calibrate from carried ranges")

    def input_scaling(self, block_name: str, block: nn.Module) -> Optional[dict[str, torch.Tensor]]:
        """After `after_forward`: how it changed what the block's linears receive. {linear name relative to the
        block: s} when input channel j of that linear is now x_j / s_j (s > 0, exact in float), {} when no linear's
        input changed. None (the default): unknown, or not a per-channel scaling (a rotation; quantized weights whose
        outputs feed other linears); carried ranges are then dropped and the next calibrating step gets a forward."""
        return None

    def output_edits(self) -> OutputEdits:
        """Config keys, extra files and description entries the saved checkpoint needs from this processor."""
        return OutputEdits()

    def publish(self) -> dict[str, Any]:
        """A spec.prior stage's processor, once its walk over the blocks is done: what it learned, by name, for the
        main stage's processors (PriorResults). Main-stage processors publish nothing."""
        return {}

    def publish_cost(self, tokens: int) -> tuple[float, int]:
        """A dry run's estimate of `publish` after a walk over `tokens` calibration tokens: (seconds, bytes of what
        the walk kept for it). Measured on a small piece, never by running it."""
        return 0.0, 0

    def changes_passthrough(self, group: PassThroughGroup) -> bool:
        """Whether `transform_passthrough` changes this group of checkpoint tensors the model does not read (e.g.
        one multi-token-prediction layer). Only such a group is read whole, in float32; the others are copied
        tensor by tensor, unchanged."""
        return False

    def transform_passthrough(self, group: PassThroughGroup, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The group's tensors ({name: float32 tensor}, the same names back) as they must be written once this
        processor has changed the model: a processor that changes the residual stream (a rotation) must change
        an MTP layer too, which reads and writes it. Called after every block was processed. Default: unchanged."""
        return tensors


class QuantRule(Protocol):
    """One {qconfig, include, exclude} rule: a `linear_quant` step or an `autoround_quant` strategy."""

    qconfig: LinearQConfig
    include: list[str]
    exclude: list[str]


def quant_rules(configs: Sequence) -> tuple[QuantRule, ...]:
    """Every quantization rule of these processor configs, in pipeline order (inside groups too)."""
    out: list[QuantRule] = []
    for c in configs:
        if c.type == "group":
            out.extend(quant_rules(c.configs))
        elif c.type == "autoround_quant":
            out.extend(c.strategies)
        elif c.type == "linear_quant":
            out.append(c)
    return tuple(out)


class PriorResults:
    """What the spec.prior stages learned (e.g. adapt_rotation's rotation), by name, handed to the main stage: the
    established tool's shared context. One per run. In a dry run no prior stage runs (`estimating`): a main-stage
    processor then times itself with a stand-in of the same shape."""

    def __init__(self, estimating: bool = False) -> None:
        self.estimating = estimating
        self._values: dict[str, Any] = {}

    def put(self, name: str, value: Any) -> None:
        self._values[name] = value

    def get(self, name: str) -> Optional[Any]:
        return self._values.get(name)


@dataclass(frozen=True)
class ProcessorContext:
    """What a processor may know about the model and the pipeline: the model's structure as data (never the
    adapter object), and the quantization rules of the steps that come after this one."""

    adapter_name: str = "?"
    structure: ModelStructure = ModelStructure()
    attention: Optional[AttentionShape] = None
    mla: Optional[MlaShape] = None  # set for multi-head latent attention (its value heads live in kv_b_proj)
    # The rules of every later step (later siblings in a group, then the steps after the group): what the
    # linears this processor sees will be quantized with. Empty: nothing after this step quantizes.
    following: tuple[QuantRule, ...] = ()
    prior: PriorResults = field(default_factory=PriorResults)  # shared by the prior stages and the main one
    # The dtype the engine runs in (the checkpoint's): tensors the engine reads in it are rounded to it before
    # anything is fitted to them (FlatQuant's transforms).
    model_dtype: torch.dtype = torch.float32

    def scheme_of(self, linear_name: str) -> Optional[LinearQConfig]:
        """The qconfig a later step gives this linear (full name), None when it stays float in this run. The
        plan refuses a linear matched by two rules, so the first match is the only one."""
        for rule in self.following:
            if select([linear_name], rule.include, rule.exclude):
                return rule.qconfig
        return None


def build_processor(config, context: ProcessorContext = ProcessorContext()) -> Processor:
    return PROCESSORS[config.type](config, context)


def build_pipeline(configs: Sequence, context: ProcessorContext = ProcessorContext()) -> list[Processor]:
    """One processor per config, each told the quantization rules of the configs after it (and of whatever
    follows the whole list, `context.following`): how smoothing learns the schemes its targets will get."""
    return [build_processor(c, replace(context, following=quant_rules(configs[i + 1 :]) + context.following))
            for i, c in enumerate(configs)]
