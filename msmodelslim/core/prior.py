"""`spec.prior`: stages run over the float model before the main one (`spec.process`), each on its own calibration
data, handing what they learn to it (app/quantize_prior.py). Today a prior stage may hold only steps that learn
without changing any weight: adapt_rotation stage 1, whose rotation adapt_rotation stage 2 applies."""
from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict, Field

from msmodelslim.processor.registry import ProcessorConfig


class PriorStage(BaseModel):
    """One entry of `spec.prior`: steps run over the float model before the main stage (`spec.process`), on their
    own calibration data (`dataset`, default spec.dataset), handing what they learn to the main stage."""

    model_config = ConfigDict(extra="forbid")

    process: list[ProcessorConfig] = Field(min_length=1)
    dataset: Optional[str] = Field(None, max_length=4096)


def _steps(configs: list) -> list:
    """The processor configs, those inside groups included, in order."""
    return [s for c in configs for s in (_steps(c.configs) if c.type == "group" else [c])]


def _learns_for_the_main_stage(step) -> bool:
    """What a prior stage may hold: steps that learn something without changing any weight, so that the main
    stage's walk reads the checkpoint as it is (adapt_rotation stage 1)."""
    return step.type == "adapt_rotation" and step.stage == 1


def check_stages(prior: list[PriorStage], process: list) -> None:
    """Prior stages learn for the main one and change no weight; adapt_rotation's stages sit where they run
    (ValueError naming what is misplaced and where it belongs)."""
    learners = 0
    for i, stage in enumerate(prior):
        for step in _steps(stage.process):
            if not _learns_for_the_main_stage(step):
                what = f"{step.type} stage {step.stage}" if step.type == "adapt_rotation" else step.type
                raise ValueError(f"prior[{i}].process holds {what}: a prior stage runs over the float model before "
                                 f"spec.process and here may only learn something for it without changing any "
                                 f"weight (adapt_rotation stage 1); put {step.type} in spec.process")
            learners += 1
    if learners > 1:
        raise ValueError("spec.prior holds adapt_rotation stage 1 more than once; one learned rotation serves "
                         "the one stage 2")
    applied = [step for step in _steps(process) if step.type == "adapt_rotation"]
    if any(step.stage == 1 for step in applied):
        raise ValueError("process holds adapt_rotation stage 1, which learns the rotation before the main "
                             "stage: move it to spec.prior (prior: [{process: [{type: adapt_rotation, stage: 1}]}])")
    if len(applied) > 1:
        raise ValueError("process holds adapt_rotation stage 2 more than once; the model is rotated once")
    if applied and not learners:
        raise ValueError("process holds adapt_rotation stage 2, which applies the rotation that adapt_rotation "
                         "stage 1 learns in spec.prior; add it there (prior: [{process: [{type: adapt_rotation, "
                         "stage: 1}]}])")
    if learners and not applied:
        raise ValueError("spec.prior learns a rotation (adapt_rotation stage 1) that nothing applies; add "
                         "adapt_rotation stage 2 to spec.process, before the quantization steps")
