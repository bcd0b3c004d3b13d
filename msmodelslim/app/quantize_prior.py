"""`spec.prior` in a quantize run: each stage built and its data read before any weight is (`prior_runs`), then
walked over the float model before the main stage, handing what it learned to it (`run_prior`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from msmodelslim.app.quantize_checks import refuse_undistributable
from msmodelslim.core.config import PracticeConfig, RunnerType
from msmodelslim.core.distributed import LOCAL, Collective, contiguous_share
from msmodelslim.core.errors import MsModelSlimError
from msmodelslim.core.runner import run_blocks
from msmodelslim.core.vlm_dataset import CalibrationData
from msmodelslim.processor.base import Processor, ProcessorContext, build_pipeline


@dataclass
class PriorRun:
    """One spec.prior stage, built and its data read before any weight is."""

    processors: list[Processor]
    calibration: CalibrationData


def prior_runs(config: PracticeConfig, runner: RunnerType, context: ProcessorContext,
               load: Callable[[Optional[str]], CalibrationData]) -> list[PriorRun]:
    """spec.prior's stages, each with its processors and its calibration data (spec.dataset unless it names its
    own; `load` reads either, as the main stage reads its own: texts, or a VLM config's images and prompts), read
    now so that a bad dataset is named before any weight is read."""
    runs = []
    for i, stage in enumerate(config.spec.prior):
        try:
            samples = load(stage.dataset)
        except MsModelSlimError as exc:
            where = f"spec.prior[{i}].dataset" if stage.dataset else f"spec.dataset (spec.prior[{i}] calibrates on it)"
            raise type(exc)(f"{where}: {exc}") from None
        processors = build_pipeline(stage.process, context)
        if runner == RunnerType.dp_layer_wise:
            refuse_undistributable(stage.process, processors, f"spec.prior[{i}].process")
        runs.append(PriorRun(processors, samples))
    return runs


def run_prior(job, device: torch.device, collective: Collective = LOCAL) -> None:
    """Each spec.prior stage walks the float model once (no writer: it changes no weight), then hands what it
    learned to the main stage. layer_wise reads the blocks again afterwards; a fresh model holds the stage's
    embeddings, since a layer_wise walk releases the tables of the model it walks."""
    for i, stage in enumerate(job.prior):
        model_wise = job.runner == RunnerType.model_wise
        model = job.model if model_wise else job.adapter.load_weights(job.adapter.init_skeleton(), device,
                                                                      load_layers=False, defer_output_head=True)
        # dp_layer_wise: each rank forwards its contiguous share, and the processors gather what they kept
        batches = contiguous_share(job.adapter.handle_dataset(stage.calibration, device), collective.rank,
                                   collective.world)
        run_blocks(job.adapter, model, stage.processors, None, batches, device, not model_wise, collective,
                   label=f"spec.prior[{i}] blocks")
        del model, batches
        for processor in stage.processors:
            for name, value in processor.publish().items():
                job.prior_results.put(name, value)
