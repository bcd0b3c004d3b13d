"""`flatquant`: FlatQuant (Sun et al., "FlatQuant: Flatness Matters for LLM Quantization", 2024), block by block.

```yaml
- type: flatquant            # every training setting is fixed (config.py)
  include: ["*"]
  exclude: []
- type: linear_quant         # W4A4_DYNAMIC: int4 per_channel symmetric weights, int4 per_token activations
  qconfig: {weight: {dtype: int4, scope: per_channel, symmetric: true, method: minmax},
            act: {dtype: int4, scope: per_token, symmetric: true, method: minmax}}
                             # or W4A4_MXFP4: mxfp4 per_block weights and activations
```

In the block's calibration forward it records the block's inputs and float outputs, and which selected linears read
the same tensor (a group: one transform, as the engine's fused q/k/v and gate/up layers need). Then it trains, with
the block's weights frozen, the groups' Kronecker transforms and activation clips and each linear's weight clip
(train.py) to make the fake-quantized block reproduce its float outputs: AdamW, `epochs` passes over the recorded
samples in steps of `cali_bsz`, the loss (mean squared error) divided by its own value, the learning rate decaying
along a cosine to flat_lr·1e-3. Finally each linear gets its group's transform as an online input transform
(ir/flat_transform.py: the weight becomes W·P⁻ᵀ) with the weight clamped to its learned clip, so that the
linear_quant after it rounds exactly what was trained (per-row min/max of the clamped weight). Each group is
trained for the rounding its later rule gives it (int4 or MXFP4) and shaped as the engine's loader expects for it
(ir/flat_transform.flat_dims: for MXFP4 row-parallel layers, L block-diagonal over the tensor-parallel ranks).

What this version leaves out: FlatQuant's per-channel scaling (add_diag; "diag_init one_style" starts it at ones)
stays at ones, since the ascendv1 kernel has no place for it (it would have to be folded into the preceding norm
or linear); and the KV-cache transforms (this writes linear layers only).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from msmodelslim.core.errors import ConfigError, ProcessingError
from msmodelslim.core.logging import get_logger
from msmodelslim.ir.flat_transform import (LEFT_TRANS, RIGHT_TRANS, attach_flat_transform, flat_dims, flat_transform,
                                           symmetric_clip)
from msmodelslim.ir.online_rotation import input_rotation
from msmodelslim.model.interface import block_hidden_state
from msmodelslim.processor.base import Processor, ProcessorContext, register_processor
from msmodelslim.processor.flatquant.config import FlatQuantConfig, FlatQuantSettings
from msmodelslim.processor.flatquant.train import FlatTrainLinear, GroupTransform
from msmodelslim.processor.matching import select
from msmodelslim.quantizer.scheme import Scheme

log = get_logger("flatquant")
CACHE_KWARGS = ("past_key_values", "past_key_value")  # a replayed forward must not append to a cache


@dataclass
class Sample:
    """One calibration batch as the block saw it: its inputs and its float output."""

    args: tuple
    kwargs: dict[str, Any]
    target: torch.Tensor


class BlockRecording:
    """The block's calibration forward: samples, and each selected linear's input in the first one (held, so that
    no later tensor of that forward can take its storage: a freed norm output's memory, reused for the next norm's
    output, would make two groups look like one)."""

    def __init__(self) -> None:
        self.samples: list[Sample] = []
        self.first_input: dict[str, torch.Tensor] = {}
        self.handles: list = []

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detached(v) for v in value)
    return value


def _groups(names: list[str], first_input: dict[str, torch.Tensor]) -> list[list[str]]:
    """The selected linears partitioned by the tensor they read (the same storage, offset and shape, all of them
    alive at once: one group)."""
    by_input: dict[tuple, list[str]] = {}
    for name in names:
        x = first_input[name]
        by_input.setdefault((x.untyped_storage().data_ptr(), x.storage_offset(), tuple(x.shape)), []).append(name)
    return list(by_input.values())


def _rows(value: Any, start: int, stop: int, batch: int) -> Any:
    """Rows start:stop of every tensor (of two dimensions or more) that runs over the batch; others as they are
    (a mask or position table broadcast over the batch, cache positions)."""
    if isinstance(value, torch.Tensor):
        return value[start:stop] if value.dim() >= 2 and value.shape[0] == batch else value
    if isinstance(value, tuple):
        return tuple(_rows(v, start, stop, batch) for v in value)
    return value


def _split(sample: Sample, rows: int) -> list[Sample]:
    """The sample in pieces of at most `rows` sequences (the runner batches several calibration texts together)."""
    batch = sample.target.shape[0] if sample.target.dim() > 2 else 1
    if batch <= rows:
        return [sample]
    return [Sample(_rows(sample.args, i, i + rows, batch), {k: _rows(v, i, i + rows, batch)
                                                            for k, v in sample.kwargs.items()},
                   sample.target[i : i + rows]) for i in range(0, batch, rows)]


def _steps(samples: list[Sample], per_step: int) -> list[list[Sample]]:
    """Consecutive calibration sequences, `per_step` of them per optimizer step (a step of several pieces sums
    their errors)."""
    steps, current, rows = [], [], 0
    for piece in (p for sample in samples for p in _split(sample, per_step)):
        current.append(piece)
        rows += piece.target.shape[0] if piece.target.dim() > 2 else 1
        if rows >= per_step:
            steps.append(current)
            current, rows = [], 0
    if current:
        steps.append(current)
    return steps


def _set_module(block: nn.Module, relative: str, module: nn.Module) -> None:
    parent, _, child = relative.rpartition(".")
    setattr(block.get_submodule(parent) if parent else block, child, module)


@register_processor("flatquant")
class FlatQuantProcessor(Processor):
    rewrites_activations = True

    def __init__(self, config: FlatQuantConfig, context: ProcessorContext = ProcessorContext(),
                 settings: FlatQuantSettings = FlatQuantSettings()) -> None:
        self.config = config
        self.context = context
        self.settings = settings
        self._recordings: dict[str, BlockRecording] = {}

    @property
    def needs_calibration(self) -> bool:
        return True

    def claims(self, linear_names: list[str]) -> dict[str, str]:
        return {}  # the later quantization rule decides the layer's type; the plan marks it _FLATQUANT

    def data_parallel_refusal(self) -> Optional[str]:
        return "it trains each block on all the calibration samples (the established tool does not distribute it)"

    def _targets(self, block_name: str, block: nn.Module) -> list[str]:
        """Relative names of the block's selected linears (the plan has checked that each becomes W4A4_DYNAMIC)."""
        names = [f"{block_name}.{n}" for n, m in block.named_modules() if isinstance(m, nn.Linear)]
        return [n[len(block_name) + 1 :] for n in select(names, self.config.include, self.config.exclude)]

    def check_model(self, model: nn.Module, block_names: list[str]) -> None:
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
                 and any(n.startswith(b + ".") for b in block_names)]
        if not select(names, self.config.include, self.config.exclude):
            raise ConfigError(f"flatquant (include={self.config.include}, exclude={self.config.exclude}) selects no "
                              f"linear layer of the decoder blocks")

    def before_forward(self, block_name: str, block: nn.Module) -> None:
        recording = BlockRecording()
        self._recordings[block_name] = recording

        def keep_sample(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            kept = {k: _detached(v) for k, v in kwargs.items() if k not in CACHE_KWARGS}
            if "use_cache" in kept:
                kept["use_cache"] = False
            recording.samples.append(Sample(_detached(args), kept, block_hidden_state(output).detach()))

        recording.handles.append(block.register_forward_hook(keep_sample, with_kwargs=True))
        for relative in self._targets(block_name, block):
            def note_input(module: nn.Module, args: tuple, name: str = relative) -> None:
                recording.first_input.setdefault(name, args[0])

            recording.handles.append(block.get_submodule(relative).register_forward_pre_hook(note_input))

    def after_forward(self, block_name: str, block: nn.Module) -> None:
        recording = self._recordings.pop(block_name)
        recording.close()
        targets = self._targets(block_name, block)
        if not recording.samples:
            raise ProcessingError(f"flatquant: {block_name} saw no calibration sample; it needs spec.dataset")
        for relative in targets:
            linear = block.get_submodule(relative)
            if input_rotation(linear) or flat_transform(linear) or type(linear) is not nn.Linear:
                raise ProcessingError(f"flatquant: {block_name}.{relative} is not a plain linear layer (an earlier "
                                      f"step rotated or split it at run time); run flatquant without that step")
        generator = torch.Generator().manual_seed(self.settings.seed + zlib.crc32(block_name.encode()))
        groups = _groups(targets, recording.first_input)
        recording.first_input.clear()
        transforms = [self._group_transform(block_name, block, g, generator) for g in groups]
        own = {p: p.requires_grad for p in block.parameters()}
        wrapped = {name: FlatTrainLinear(block.get_submodule(name), transform, self.settings.clip_init)
                   for group, transform in zip(groups, transforms) for name in group}
        for name, module in wrapped.items():
            _set_module(block, name, module)
        try:
            start, end = self._train(block, wrapped, transforms, recording.samples)
        finally:
            for name, module in wrapped.items():
                _set_module(block, name, module.linear)
            for p, flag in own.items():
                p.requires_grad_(flag)
        log.debug("%s: block output MSE %.4e -> %.4e over %d groups", block_name, start, end, len(groups))
        self._apply(wrapped, self.context.model_dtype)

    def _group_transform(self, block_name: str, block: nn.Module, group: list[str],
                         generator: torch.Generator) -> GroupTransform:
        """The group's transform, shaped as the engine's loader expects for the rounding behind it (the later
        linear_quant's scheme: W4A4_DYNAMIC or W4A4_MXFP4, which the plan has checked) and the layers' kind
        (row-parallel layers: L block-diagonal over the ranks)."""
        kinds = set()
        for name in group:
            qconfig = self.context.scheme_of(f"{block_name}.{name}")
            mxfp4 = qconfig is not None and qconfig.scheme == Scheme.W4A4_MXFP4
            kinds.add((mxfp4, self.context.structure.is_row_parallel(name)))
        if len(kinds) > 1:
            raise ProcessingError(f"flatquant: {block_name}'s layers {group} read one input but are quantized or "
                                  f"split differently ({sorted(kinds)}); one transform serves them all: give them "
                                  f"one scheme")
        mxfp4, row_parallel = kinds.pop()
        dims = flat_dims(block.get_submodule(group[0]).in_features, mxfp4, row_parallel)
        return GroupTransform(dims, generator, self.settings.clip_init, mxfp4)

    def _train(self, block: nn.Module, wrapped: dict[str, FlatTrainLinear], transforms: list[GroupTransform],
               samples: list[Sample]) -> tuple[float, float]:
        s = self.settings
        transform_params = [p for t in transforms for p in t.transform_parameters()]
        clip_params = [t.clip_logit for t in transforms] + [m.weight_clip_logit for m in wrapped.values()]
        block.requires_grad_(False)  # the block's own weights stay as they are (the caller restores the flags)
        for p in transform_params + clip_params:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW([{"params": transform_params, "lr": s.flat_lr},
                                       {"params": clip_params, "lr": s.flat_lr * s.clip_lr_factor}])
        steps = _steps(samples, s.cali_bsz)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, s.epochs * len(steps)),
                                                              eta_min=s.flat_lr * s.final_lr_factor)
        means = []
        device = next(iter(wrapped.values())).linear.weight.device
        with torch.enable_grad():
            for _ in range(s.epochs):
                total = 0.0
                for step in steps:
                    # FlatQuant trains under AMP on accelerators; on a CPU autocast made a SmolLM2 block's step
                    # twice as slow (casts cost more than bfloat16 matmuls save), so it stays float32 there
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type != "cpu"):
                        loss = self._step_loss(block, step)
                    total += float(loss.detach())
                    optimizer.zero_grad(set_to_none=True)
                    (loss / loss.detach().clamp(min=1e-30)).backward()  # FlatQuant's scale-free step
                    optimizer.step()
                    schedule.step()
                means.append(total / len(steps))
        return (means[0], means[-1]) if means else (float("nan"), float("nan"))

    @staticmethod
    def _step_loss(block: nn.Module, step: list[Sample]) -> torch.Tensor:
        """Mean squared error of the block's output against the float output, over the step's samples."""
        squared, count = 0.0, 0
        for sample in step:
            output = block_hidden_state(block(*sample.args, **sample.kwargs))
            squared = squared + (output.float() - sample.target.float()).pow(2).sum()
            count += sample.target.numel()
        return squared / count

    @staticmethod
    @torch.no_grad()
    def _apply(wrapped: dict[str, FlatTrainLinear], model_dtype: torch.dtype) -> None:
        """Each linear behind its group's learned transform, its transformed weight clamped to its learned clip.
        L and R are first rounded to the model's dtype, in which the engine holds them (vLLM-Ascend's parameters):
        the weight then absorbs the inverse of exactly the matrices the kernel applies."""
        for module in wrapped.values():
            linear = module.linear
            learned = module.group.learned()
            for key in (LEFT_TRANS, RIGHT_TRANS):
                learned[key] = learned[key].to(model_dtype).float()
            attach_flat_transform(linear, learned, mxfp4=module.group.mxfp4)
            w = linear.weight
            w.copy_(symmetric_clip(w, module.weight_clip().to(w.device).reshape(-1, 1), 1))
