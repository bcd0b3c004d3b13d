"""Calibration forwards for families whose decoder layers are called with different arguments: Step-3.5's
sliding-window and full-attention layers (their own masks and rotary tables), Qwen3-Next's linear- and
full-attention layers (their own masks). `TransformersModel` runs every block on the first block's arguments,
which would give such a layer another layer's mask or rotary table; these families record, in one forward of the
model, the arguments the model itself passes to each block (the default adapter's recorder,
model/default.py) and run each block on its own.
"""
from __future__ import annotations

from msmodelslim.model.default import DefaultAdapter


class EveryBlockArguments:
    """Mixin (before TransformersModel in the bases): each block calibrates on its own recorded arguments."""

    _record_block_arguments = DefaultAdapter._record_block_arguments
    capture_block_inputs = DefaultAdapter.capture_block_inputs
    generate_model_forward = DefaultAdapter.generate_model_forward
