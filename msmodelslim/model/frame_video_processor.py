"""Qwen2-VL-style video preprocessing for a video given as a directory of frames, without torchvision (the Omni
thinkers' calibration videos, model/vlm_omni.py; core/vlm_dataset.py reads the frames)."""
from __future__ import annotations

from typing import Any

import numpy as np

from msmodelslim.core.errors import ProcessingError, UnsupportedError


class FrameVideoProcessor:
    """The family's video preprocessing for a video given as frames, without torchvision (transformers' Qwen2-VL
    video processor needs it): every frame goes through the image processor (resize to the same multiple of
    patch x merge, rescale, normalize), the frame count is padded to a multiple of temporal_patch_size by
    repeating the last frame, and each patch holds `temporal_patch_size` consecutive frames, laid out [C, T, p, p]
    (the order of Qwen2-VL's patchify, whose image patches repeat one frame T times: a clip of T identical frames
    equals the image, tests/test_vlm_omni.py)."""

    model_input_names = ["pixel_values_videos", "video_grid_thw"]

    def __init__(self, image_processor) -> None:
        self.image_processor = image_processor
        self.temporal_patch_size = image_processor.temporal_patch_size
        self.merge_size = image_processor.merge_size
        self.patch_size = image_processor.patch_size

    def __call__(self, videos, return_tensors=None, **_kwargs) -> dict[str, Any]:
        from transformers import BatchFeature

        patches, grids = [], []
        for frames in videos:
            if not isinstance(frames, (list, tuple)):
                raise UnsupportedError(f"video {frames}: without torchvision a video is read as a directory of "
                                       f"numbered frames, not as a file")
            clip, grid = self._clip(list(frames))
            patches.append(clip)
            grids.append(grid)
        return BatchFeature(data={"pixel_values_videos": np.concatenate(patches),
                                  "video_grid_thw": np.array(grids, dtype=np.int64)}, tensor_type=return_tensors)

    def _clip(self, frames: list) -> tuple[np.ndarray, list[int]]:
        t, p = self.temporal_patch_size, self.patch_size
        if not frames:
            raise ProcessingError("a video without frames")
        size = frames[0].size
        if any(f.size != size for f in frames):
            raise ProcessingError(f"the frames of one video must have one size; got {sorted({f.size for f in frames})}")
        frames = frames + [frames[-1]] * (-len(frames) % t)
        per_frame, grid_hw = [], None
        for frame in frames:
            encoded = self.image_processor(images=[frame], return_tensors="np")
            grid_hw = [int(x) for x in encoded["image_grid_thw"][0][1:]]
            values = encoded["pixel_values"]  # [gh*gw, C*T*p*p], the one frame repeated T times
            per_frame.append(values.reshape(values.shape[0], -1, t, p, p)[:, :, 0])  # [gh*gw, C, p, p]
        groups = [np.stack(per_frame[i:i + t], axis=2) for i in range(0, len(per_frame), t)]  # [gh*gw, C, T, p, p]
        clip = np.concatenate([g.reshape(g.shape[0], -1) for g in groups])
        return clip, [len(groups), *grid_hw]
