"""`adapt_rotation`: QuaRot with a rotation learned from calibration data instead of a random Hadamard one, in two
stages (the established tool's LAOS W4A4 recipe puts stage 1 in spec.prior, then stage 2 and autoround_quant):

    spec:
      prior:
        - process:
            - {type: adapt_rotation, stage: 1, layer_type: [up_proj], steps: 20, quant_dtype: int4, max_samples: 2048}
          dataset: laos_calib.jsonl      # optional; spec.dataset by default
      process:
        - {type: adapt_rotation, stage: 2, online: false}
        - {type: autoround_quant, ...}

Stage 1 (`AdaptRotationLearner`) walks the float model once: for every decoder layer it keeps at most
`max_samples` rows of the input of each RMSNorm that feeds a linear named by `layer_type` (up_proj: the norm
before the MLP), normalised without the norm's gain, which QuaRot folds into the linears; that is what those
linears read once the stream is rotated. From all the rows it learns the rotation (learn.py), starting from
QuaRot's random Hadamard of the same `seed` and `block_size`, and hands it to stage 2 (PriorResults). Stage 2
(`AdaptRotationApplier`) is `quarot` with that rotation of the residual stream; the value heads and the online
rotations are quarot's. The float model's outputs are unchanged, as with quarot."""
from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from msmodelslim.core.errors import ProcessingError, UnsupportedError
from msmodelslim.core.logging import get_logger
from msmodelslim.processor.adapt_rotation.config import AdaptRotationConfig
from msmodelslim.processor.adapt_rotation.learn import (ROWS_PER_CHUNK, learn_rotation, procrustes_step,
                                                        quantization_error)
from msmodelslim.processor.base import Processor, ProcessorContext, register_processor
from msmodelslim.processor.quarot import rotate
from msmodelslim.processor.quarot.hadamard import block_diagonal, random_rotation
from msmodelslim.processor.quarot.processor import QuaRotProcessor
from msmodelslim.processor.sampling import ThinnedRowSample

if TYPE_CHECKING:
    from msmodelslim.core.distributed import Collective

log = get_logger("adapt_rotation")
RESULT = "adapt_rotation"  # the name stage 1 publishes the rotation under


def starting_rotation(hidden: int, block_size: int, seed: int) -> torch.Tensor:
    """QuaRot's rotation for these settings (float64): a random Hadamard, block diagonal for block_size > 0."""
    size = hidden if block_size == -1 else block_size
    if hidden % size:
        raise UnsupportedError(f"adapt_rotation: block_size {size} does not divide the hidden size {hidden}")
    q, is_hadamard = random_rotation(size, seed)
    if not is_hadamard:
        log.warning("adapt_rotation: no Hadamard matrix of order %d is known here; starting from a random orthogonal "
                    "rotation", size)
    return block_diagonal(q, hidden // size)


def _norm_epsilon(norm: nn.Module) -> float:
    for attribute in ("variance_epsilon", "eps"):
        value = getattr(norm, attribute, None)
        if isinstance(value, float):
            return value
    raise UnsupportedError(f"adapt_rotation: {type(norm).__name__} has no epsilon attribute (variance_epsilon or eps)")


class AdaptRotationLearner(Processor):
    """Stage 1: collect the normalised rows, then learn the rotation (`publish`)."""

    def __init__(self, config: AdaptRotationConfig, context: ProcessorContext) -> None:
        if context.structure.rotation is None:
            raise UnsupportedError(f"adapt_rotation: adapter {context.adapter_name} does not describe where to rotate "
                                   f"(ModelStructure.rotation, the QuaRot interface)")
        self.config = config
        self.context = context
        self.norms: dict[str, list[str]] = {}  # {decoder block: its norms whose inputs are collected}
        self.hidden = 0
        self.collected: list[torch.Tensor] = []
        self._samples: dict[str, ThinnedRowSample] = {}
        self._hooks: list = []

    @property
    def needs_calibration(self) -> bool:
        return True

    def claims(self, linear_names: list[str]) -> dict[str, str]:
        return {}

    def check_model(self, model: nn.Module, block_names: list[str]) -> None:
        """On the empty model: the norms that feed a linear named by layer_type, in every decoder layer; a name that
        matches only linears off the residual stream (down_proj, o_proj) is refused, since the rotation learned is
        the stream's."""
        s = self.context.structure.rotation
        self.hidden = model.get_submodule(s.embedding).weight.shape[1]
        self.norms = {}
        wanted = self.config.layer_type
        off_stream: set[str] = set()
        for block_name in block_names:
            if not self.context.structure.is_decoder_layer(block_name):
                continue
            modules = dict(model.get_submodule(block_name).named_modules())
            linears = [n for n, m in modules.items() if isinstance(m, nn.Linear) and any(t in n for t in wanted)]
            fed = set()
            for norm, readers in s.norm_readers:
                matched = [n for pattern in readers for n in rotate.matching(linears, pattern)]
                if matched and norm in modules:
                    if "RMSNorm" not in type(modules[norm]).__name__:
                        raise UnsupportedError(f"adapt_rotation: {block_name}.{norm} is a {type(modules[norm]).__name__}; "
                                               f"the rotation is exact only through an RMSNorm")
                    self.norms.setdefault(block_name, []).append(norm)
                    fed.update(matched)
            off_stream.update(n for n in linears if n not in fed)
        if not self.norms:
            found = f"only {', '.join(sorted(off_stream)[:4])}, which do(es) not read the residual stream" \
                if off_stream else "no linear"
            raise UnsupportedError(f"adapt_rotation stage 1: layer_type {wanted} names {found} in this model's decoder "
                                   f"layers; the rotation learned is the residual stream's, so name linears that read "
                                   f"it through a norm (e.g. up_proj, gate_proj, q_proj)")
        if off_stream:
            log.info("adapt_rotation stage 1: layer_type %s also names %s, which do(es) not read the residual stream; "
                     "their inputs are not collected", wanted, ", ".join(sorted(off_stream)[:4]))

    def before_forward(self, block_name: str, block: nn.Module) -> None:
        for norm_name in self.norms.get(block_name, []):
            norm = block.get_submodule(norm_name)
            sample = self._samples[norm_name] = ThinnedRowSample(self.config.max_samples)
            self._hooks.append(norm.register_forward_pre_hook(self._collector(sample, _norm_epsilon(norm))))

    @staticmethod
    def _collector(sample: ThinnedRowSample, eps: float):
        def hook(module, args):
            x = args[0]
            # the norm without its gain: what the linears read once QuaRot folded the gain into them
            sample.add(F.rms_norm(x.float(), (x.shape[-1],), eps=eps))
        return hook

    def data_parallel_refusal(self) -> Optional[str]:
        return None  # synchronize gathers every rank's rows

    def synchronize(self, block_name: str, block: nn.Module, collective: "Collective") -> None:
        """dp_layer_wise: every rank's rows in rank order (contiguous data shares: a single process's order),
        thinned again to max_samples; every rank then learns the same rotation from the same rows. Where no rank
        thinned (at most 2·max_samples tokens each) these are exactly the rows one process keeps."""
        for norm_name, sample in self._samples.items():
            rows = torch.cat(sample.rows) if sample.rows else torch.zeros(0, self.hidden)
            merged = ThinnedRowSample(self.config.max_samples)
            merged.add(collective.gather_rows(rows))
            self._samples[norm_name] = merged

    def after_forward(self, block_name: str, block: nn.Module) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self.collected += [sample.take() for sample in self._samples.values() if sample.rows]
        self._samples = {}

    def publish(self) -> dict[str, Any]:
        if not self.collected:
            raise ProcessingError("adapt_rotation stage 1 collected no activations (no calibration batch reached a "
                                  "decoder layer)")
        rows = torch.cat(self.collected)
        self.collected = []
        start = starting_rotation(self.hidden, self.config.block_size, self.config.seed)
        block = self.hidden if self.config.block_size == -1 else self.config.block_size
        learned = learn_rotation(rows, start, self.config.bits, self.config.steps, block)
        log.info("adapt_rotation stage 1: %d rows of %d layers; per-token %s error (relative) %.4g with QuaRot's "
                 "Hadamard, %.4g learned (step %d of %d)", len(rows), len(self.norms), self.config.quant_dtype,
                 learned.errors[0], learned.errors[learned.best_step], learned.best_step, self.config.steps)
        return {RESULT: learned.rotation}

    def publish_cost(self, tokens: int) -> tuple[float, int]:
        """The rows kept (at most max_samples per collected norm) and the learning's time: a step (which also reads
        off the error) and the last error pass timed on one chunk of rows (after one untimed step), less the step's
        polar factor, which is taken once per step whatever the rows; scaled by the chunks and the steps."""
        norms = sum(len(n) for n in self.norms.values())
        rows = min(self.config.max_samples, tokens) * norms
        block = self.hidden if self.config.block_size == -1 else self.config.block_size
        chunk = torch.randn(min(rows, ROWS_PER_CHUNK), self.hidden, generator=torch.Generator().manual_seed(0))
        q = starting_rotation(self.hidden, self.config.block_size, self.config.seed).float()
        procrustes_step(chunk, q, self.config.bits, block)  # first calls pay one-time costs
        clock = time.perf_counter()
        procrustes_step(chunk, q, self.config.bits, block)
        step_s = time.perf_counter() - clock
        clock = time.perf_counter()
        procrustes_step(chunk[:1], q, self.config.bits, block)  # nearly only the polar factor
        polar_s = time.perf_counter() - clock
        clock = time.perf_counter()
        quantization_error(chunk, q, self.config.bits)
        error_s = time.perf_counter() - clock
        chunks = math.ceil(rows / max(len(chunk), 1))
        per_step = chunks * max(step_s - polar_s, 0.0) + polar_s
        return self.config.steps * per_step + chunks * error_s, rows * self.hidden * 4


class AdaptRotationApplier(QuaRotProcessor):
    """Stage 2: quarot, its residual-stream rotation the one stage 1 learned."""

    def __init__(self, config: AdaptRotationConfig, context: ProcessorContext) -> None:
        super().__init__(config.quarot_config(), context)

    def _rotation(self, hidden: int) -> torch.Tensor:
        learned = self.context.prior.get(RESULT)
        if learned is None and self.context.prior.estimating:  # a dry run times stage 2 with the starting rotation
            return starting_rotation(hidden, self.config.block_size, self.config.seed).float()
        if learned is None:
            raise ProcessingError("adapt_rotation stage 2: no rotation was learned; spec.prior must run "
                                  "adapt_rotation stage 1 first")
        if learned.shape != (hidden, hidden):
            raise ProcessingError(f"adapt_rotation stage 2: the learned rotation is {tuple(learned.shape)}, the hidden "
                                  f"size {hidden}")
        return learned.float()


@register_processor("adapt_rotation")
def build_adapt_rotation(config: AdaptRotationConfig, context: ProcessorContext) -> Processor:
    return AdaptRotationLearner(config, context) if config.stage == 1 else AdaptRotationApplier(config, context)
