"""`group`: run child processors side by side so one calibration forward per block serves them all."""
from __future__ import annotations

from typing import Optional

from torch import nn

from msmodelslim.format.edits import OutputEdits
from msmodelslim.processor.base import Processor, ProcessorContext, build_processor, register_processor
from msmodelslim.processor.group.config import GroupConfig


@register_processor("group")
class GroupProcessor(Processor):
    label = "group.configs"  # how claims name a child

    def __init__(self, config: GroupConfig, context: ProcessorContext) -> None:
        self.children = [build_processor(c, context) for c in config.configs]

    @property
    def needs_calibration(self) -> bool:
        return any(c.needs_calibration for c in self.children)

    def claims(self, linear_names: list[str]) -> dict[str, str]:
        from msmodelslim.processor.registry import merge_claims

        return merge_claims([(f"{self.label}[{i}]", c.claims(linear_names)) for i, c in enumerate(self.children)])

    def prepare_model(self, model: nn.Module) -> None:
        for child in self.children:
            child.prepare_model(model)

    def before_forward(self, block_name: str, block: nn.Module) -> None:
        for child in self.children:
            child.before_forward(block_name, block)

    def data_parallel_refusal(self) -> Optional[str]:
        reasons = [f"{self.label}[{i}]: {r}" for i, c in enumerate(self.children) if (r := c.data_parallel_refusal())]
        return "; ".join(reasons) or None

    def synchronize(self, block_name: str, block: nn.Module, collective) -> None:
        for child in self.children:
            child.synchronize(block_name, block, collective)

    def after_forward(self, block_name: str, block: nn.Module) -> None:
        for child in self.children:
            child.after_forward(block_name, block)

    def output_edits(self) -> OutputEdits:
        edits = OutputEdits()
        for child in self.children:
            edits = edits.merge(child.output_edits())
        return edits
