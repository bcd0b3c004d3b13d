"""What every processor offers the runner, and the registry that maps YAML `type` names to processors.

The runner walks the decoder blocks in order and, on each block, runs the processors in config order: for
each one `before_forward` (attach observers), the calibration forward over all batches if that processor
`needs_calibration` (so it sees the block as the processors before it left it), then `after_forward`
(smooth, quantize, replace modules). Processors never load weights or touch other blocks; a whole-model
transform changes the non-block modules once, in `prepare_model`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

from torch import nn

from msmodelslim.format.edits import OutputEdits
from msmodelslim.model.interface import AttentionShape, ModelStructure

if TYPE_CHECKING:
    from msmodelslim.core.distributed import Collective

PROCESSORS: dict[str, Callable[..., "Processor"]] = {}


def register_processor(type_name: str):
    def wrap(cls):
        PROCESSORS[type_name] = cls
        return cls

    return wrap


class Processor(ABC):
    @property
    @abstractmethod
    def needs_calibration(self) -> bool: ...

    @abstractmethod
    def claims(self, linear_names: list[str]) -> dict[str, str]:
        """Which of these linears this processor will rewrite, each mapped to a description of the rule."""

    def prepare_model(self, model: nn.Module) -> None:
        """Called once before any block is visited, with only the non-block modules (embeddings, final norm,
        head) materialised; transforms that span the whole model (rotations) change them here."""

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

    def output_edits(self) -> OutputEdits:
        """Config keys, extra files and description entries the saved checkpoint needs from this processor."""
        return OutputEdits()


@dataclass(frozen=True)
class ProcessorContext:
    """What a processor may know about the model: its structure as data, never the adapter object."""

    adapter_name: str = "?"
    structure: ModelStructure = ModelStructure()
    attention: Optional[AttentionShape] = None


def build_processor(config, context: ProcessorContext = ProcessorContext()) -> Processor:
    return PROCESSORS[config.type](config, context)
