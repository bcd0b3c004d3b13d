"""`group`: run child processors side by side so one calibration forward per block serves them all."""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Iterator, Optional

from torch import nn

from msmodelslim.core.errors import ConfigError
from msmodelslim.format.edits import OutputEdits
from msmodelslim.processor.base import Processor, ProcessorContext, build_pipeline, register_processor
from msmodelslim.processor.group.config import GroupConfig


def _refuse_stale_calibration(config: GroupConfig, children: list[Processor]) -> None:
    """Children share one calibration forward: a child that changes the block's activations after it (smoothing,
    rotation) must not precede one that calibrates on them, or that one's static ranges / Hessians are stale."""
    for i, child in enumerate(children):
        if not child.rewrites_activations:
            continue
        stale = [j for j in range(i + 1, len(children)) if children[j].needs_calibration]
        if stale:
            first = config.configs[i].type
            raise ConfigError(
                f"group.configs[{i}] ({first}) changes the activations after the group's shared calibration forward, "
                f"so group.configs[{stale[0]}] ({config.configs[stale[0]].type}) would calibrate on activations from "
                f"before that change; put {first} before the group in spec.process")


@register_processor("group")
class GroupProcessor(Processor):
    label = "group.configs"  # how claims name a child

    def __init__(self, config: GroupConfig, context: ProcessorContext) -> None:
        self.children = build_pipeline(config.configs, context)  # each child knows the siblings after it
        _refuse_stale_calibration(config, self.children)

    @property
    def needs_calibration(self) -> bool:
        return any(c.needs_calibration for c in self.children)

    def claims(self, linear_names: list[str]) -> dict[str, str]:
        from msmodelslim.processor.registry import merge_claims

        return merge_claims([(f"{self.label}[{i}]", c.claims(linear_names)) for i, c in enumerate(self.children)])

    @property
    def changes_outside_blocks(self) -> bool:
        return any(child.changes_outside_blocks for child in self.children)

    @property
    def takes_stored_weights(self) -> bool:
        return all(child.takes_stored_weights for child in self.children)

    def prepare_model(self, model: nn.Module) -> None:
        for child in self.children:
            child.prepare_model(model)

    def check_model(self, model: nn.Module, block_names: list[str]) -> None:
        for child in self.children:
            child.check_model(model, block_names)

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

    @property
    def uses_reference(self) -> bool:
        return any(child.uses_reference for child in self.children)

    def needs_reference(self, block_name: str, block: nn.Module) -> bool:
        return any(child.needs_reference(block_name, block) for child in self.children)

    @contextmanager
    def watch_reference(self, block_name: str, reference_block: nn.Module) -> Iterator[None]:
        with ExitStack() as stack:
            for child in self.children:
                stack.enter_context(child.watch_reference(block_name, reference_block))
            yield

    @property
    def range_statistics(self) -> bool:
        return all(c.range_statistics for c in self.children if c.needs_calibration)

    def ranges_suffice(self, block_name: str, block: nn.Module, ranges) -> bool:
        return all(c.ranges_suffice(block_name, block, ranges) for c in self.children if c.needs_calibration)

    def calibrate_from_ranges(self, block_name: str, block: nn.Module, ranges) -> None:
        """What the shared forward would give: each calibrating child takes the ranges; the others get their
        usual before_forward (no forward follows it)."""
        for child in self.children:
            if child.needs_calibration:
                child.calibrate_from_ranges(block_name, block, ranges)
            else:
                child.before_forward(block_name, block)

    def input_scaling(self, block_name: str, block: nn.Module) -> Optional[dict]:
        """The children's scalings composed (a linear scaled by two divides by the product); None if any is."""
        total: dict = {}
        for child in self.children:
            scaling = child.input_scaling(block_name, block)
            if scaling is None:
                return None
            for name, s in scaling.items():
                total[name] = total[name] * s if name in total else s
        return total

    def output_edits(self) -> OutputEdits:
        edits = OutputEdits()
        for child in self.children:
            edits = edits.merge(child.output_edits())
        return edits

    def changes_passthrough(self, group) -> bool:
        return any(child.changes_passthrough(group) for child in self.children)

    def transform_passthrough(self, group, tensors: dict) -> dict:
        for child in self.children:
            if child.changes_passthrough(group):
                tensors = child.transform_passthrough(group, tensors)
        return tensors
