"""Where a quantize run starts (issue #23 item 4): the fingerprint its block checkpoints carry and, with --resume,
the interrupted run's checkpoint to continue from, both settled before any weight is read."""
from __future__ import annotations

from typing import Optional

from msmodelslim.app.quantize_output import saved_practice
from msmodelslim.app.quantize_request import QuantizeRequest
from msmodelslim.core.config import PracticeConfig, RunnerType
from msmodelslim.core.errors import UnsupportedError
from msmodelslim.core.logging import get_logger
from msmodelslim.core.resume import CheckpointSchedule, Fingerprint, ResumePoint, describe, read_checkpoint
from msmodelslim.core.vlm_dataset import CalibrationData
from msmodelslim.format.staging import resumable

log = get_logger("app.quantize")


def resume_point(request: QuantizeRequest, config: PracticeConfig, runner: RunnerType, calibration: CalibrationData,
                 block_names: list[str]) -> tuple[Optional[Fingerprint], Optional[ResumePoint]]:
    """The fingerprint block checkpoints carry and, with --resume, the checked checkpoint to continue from. Before
    any weight is read: a checkpoint of another config, model, data set or code version is refused here."""
    if runner == RunnerType.dp_layer_wise:
        if request.resume:
            raise UnsupportedError("--resume works with spec.runner layer_wise and model_wise; a dp_layer_wise run "
                                   "keeps no block checkpoints (its ranks hold their own shares of the calibration "
                                   "activations). Run without --resume, or with spec.runner layer_wise")
        return None, None
    CheckpointSchedule.from_env()  # a typo in MSMODELSLIM_CHECKPOINT_SECONDS fails here, before any weight is read
    fingerprint = Fingerprint.of_run(saved_practice(config), request.model_type, request.model_path, calibration,
                                     runner.value, str(request.device.primary))
    if not request.resume:
        return fingerprint, None
    candidates = resumable(request.save_path)
    if not candidates:
        log.info("--resume: no interrupted run of %s left a checkpoint; starting from the first block",
                 request.save_path)
        return fingerprint, None
    point = read_checkpoint(candidates[0], fingerprint, block_names)
    log.info("--resume: continuing the interrupted run in %s (%s)%s", point.staging,
             describe(point, len(block_names)), "; dry run: nothing is changed" if request.dry_run else "")
    return fingerprint, point
