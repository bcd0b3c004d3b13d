"""`online_quarot` on a diffusion transformer: the online rotations of rotation.py at the rotation sites its family
describes (model/diffusion/attention.py: every attention's q_rot and k_rot, of size head_dim), as the established
tool's Wan, FLUX.1, HunyuanVideo and Qwen-Image adapters place them (OnlineQuaRotInterface, rotation_type
"replace"): Q and K are rotated right before the attention kernel, so a later fa3_quant step quantizes the rotated
Q/K (outliers spread over the head), while the attention scores stay what they were.

    - type: online_quarot
      block_size: -1          # one Hadamard of order head_dim; b > 0: block-diagonal with b x b blocks
      include: null           # sites, e.g. ["*attn1.q_rot", "*attn1.k_rot"]; null: every site
      exclude: null

Data-free: the rotation is installed after the block's calibration forwards of the steps before it, and the steps
after it see it. Each rotation is saved as a FLOAT tensor named after its site (`blocks.0.attn1.q_rot`, [d, d]).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from msmodelslim.core.errors import UnsupportedError
from msmodelslim.core.logging import get_logger
from msmodelslim.model.diffusion.attention import ROTATION_SLOTS, DitAttentionLayout, set_slot
from msmodelslim.processor.base import Processor
from msmodelslim.processor.online_quarot.config import OnlineQuaRotConfig
from msmodelslim.processor.online_quarot.rotation import OnlineRotation, rotation_matrix

log = get_logger("online_quarot")


class OnlineQuaRotProcessor(Processor):
    def __init__(self, config: OnlineQuaRotConfig, layout: DitAttentionLayout) -> None:
        self.config = config
        self.layout = layout
        self._sites: set[str] = set()  # selected sites, full names
        self._matrices: dict[int, torch.Tensor] = {}  # {size: R}

    @property
    def needs_calibration(self) -> bool:
        return False

    def claims(self, linear_names: list[str]) -> dict[str, str]:
        return {}  # attention activations, not linears

    def check_model(self, model: nn.Module, block_names: list[str]) -> None:
        """On the empty model: every site's attention can be tapped and has a Hadamard rotation of its head size."""
        sites = []
        for name, attention in self.layout.tappable_attentions(model, block_names, "online_quarot"):
            size = self.layout.head_dim(attention)
            try:
                self._matrix(size)
            except ValueError as exc:
                raise UnsupportedError(f"online_quarot: {name} (head_dim {size}): {exc}") from None
            sites += [f"{name}.{slot}" for slot in ROTATION_SLOTS]
        include, exclude = self.config.include or ["*"], self.config.exclude or []
        for pattern in self.layout.unused_patterns(sites, include + exclude):
            log.warning("online_quarot: pattern %r matches no rotation site (names look like %s)", pattern, sites[0])
        self._sites = set(self.layout.select(sites, include, exclude))

    def _matrix(self, size: int) -> torch.Tensor:
        if size not in self._matrices:
            self._matrices[size] = rotation_matrix(size, self.config.block_size)
        return self._matrices[size]

    def after_forward(self, block_name: str, block: nn.Module) -> None:
        for path in self.layout.modules:
            attention = block.get_submodule(path)
            for slot in ROTATION_SLOTS:
                if f"{block_name}.{path}.{slot}" not in self._sites:
                    continue
                if getattr(attention, slot, None) is not None:
                    raise UnsupportedError(f"online_quarot: {block_name}.{path}.{slot} is already rotated by an "
                                           f"earlier online_quarot step; select each site in one step only")
                matrix = self._matrix(self.layout.head_dim(attention))
                set_slot(attention, slot, OnlineRotation(matrix).to(next(attention.parameters()).device))

    def data_parallel_refusal(self) -> Optional[str]:
        return None
