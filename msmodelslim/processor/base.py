"""What every processor offers the runner, and the registry that maps YAML `type` names to processors.

The runner walks the decoder blocks in order. For each block it calls `before_forward` on every processor
(attach observers), runs the calibration forward once if any processor `needs_calibration`, then calls
`after_forward` (quantize, replace modules). Processors never load weights or touch other blocks.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

from torch import nn

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

    def before_forward(self, block_name: str, block: nn.Module) -> None:
        """Called before the block's calibration forward (or visit, for data-free pipelines)."""

    @abstractmethod
    def after_forward(self, block_name: str, block: nn.Module) -> None:
        """Called after the calibration forward; rewrite the block's modules here."""


def build_processor(config) -> Processor:
    return PROCESSORS[config.type](config)
