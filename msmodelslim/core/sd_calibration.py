"""Calibration data of a diffusion transformer: the inputs of its first block, captured while the float pipeline
samples the configured prompts over all its timesteps (`capture_mode: args`: the block's positional arguments).

A pipeline with several denoisers (Wan2.2-T2V-A14B's high- and low-noise experts) samples once; each expert's
first block is captured at the steps at which the pipeline calls that expert, into a dump of its own.

Sampling a video model is the most expensive part of a run, so the capture is dumped once into
`<dump_data_dir>/calib_data.pth` (per expert: `calib_data_<task>_<expert>.pth`) and reused by later runs. The dump carries a fingerprint of what produced it:
the pipeline's files (model_index.json and every component's config and weights, each weight file by its size
and a hash of its first and last MiB), the sampling settings, the capture mode and the expert. A dump whose fingerprint
differs is refused, naming what differs: calibrating a DiT on another model's or another sampling's activations
would give wrong ranges silently.
"""
from __future__ import annotations

import hashlib
import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from msmodelslim.core.errors import InvalidDatasetError
from msmodelslim.core.logging import get_logger

log = get_logger("core.sd_calibration")

DUMP_FILE = "calib_data.pth"
DUMP_FORMAT = "msmodelslim.sd_calibration/1"
EDGE_BYTES = 1 << 20  # hashed at each end of a weight file: distinguishes checkpoints without reading GBs


def dump_name(task: str, expert: str) -> str:
    """calib_data.pth for a single DiT, calib_data_<task>_<expert>.pth for an expert (protocol.md 2.8)."""
    return f"calib_data_{task}_{expert}.pth" if expert else DUMP_FILE


def file_digest(path: Path) -> str:
    """sha256 of the file's size and its first and last MiB (the whole file when it is smaller)."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(EDGE_BYTES))
        if size > EDGE_BYTES:
            f.seek(max(EDGE_BYTES, size - EDGE_BYTES))
            digest.update(f.read())
    return digest.hexdigest()


def pipeline_files(model_path: Path) -> dict[str, str]:
    """{path relative to the pipeline folder: digest} for model_index.json and every file in its subfolders."""
    files = {"model_index.json": file_digest(model_path / "model_index.json")}
    for path in sorted(model_path.rglob("*")):
        relative = path.relative_to(model_path)
        if path.is_file() and len(relative.parts) > 1 and not relative.parts[0].startswith("."):
            files[relative.as_posix()] = file_digest(path)
    return files


def fingerprint(model_path: Path, sampling: dict[str, Any], capture_mode: str, expert: str = "") -> dict[str, Any]:
    return {"files": pipeline_files(model_path), "sampling": dict(sampling), "capture_mode": capture_mode,
            "expert": expert}


def fingerprint_differences(expected: dict[str, Any], found: dict[str, Any]) -> list[str]:
    """What differs between two fingerprints, as the user reads it (at most a few names per kind)."""
    out: list[str] = []
    files_a, files_b = expected.get("files", {}), found.get("files", {})
    changed = sorted(k for k in files_a.keys() | files_b.keys() if files_a.get(k) != files_b.get(k))
    if changed:
        out.append(f"model files ({', '.join(changed[:4])}{' ...' if len(changed) > 4 else ''})")
    sampling_a, sampling_b = expected.get("sampling", {}), found.get("sampling", {})
    keys = sorted(k for k in sampling_a.keys() | sampling_b.keys() if sampling_a.get(k) != sampling_b.get(k))
    out.extend(f"inference_config.{k} ({sampling_b.get(k)!r} in the dump, {sampling_a.get(k)!r} now)" for k in keys)
    if expected.get("capture_mode") != found.get("capture_mode"):
        out.append("capture_mode")
    if expected.get("expert", "") != found.get("expert", ""):  # a dump renamed to another expert's file
        out.append(f"expert ({found.get('expert', '') or 'the single DiT'} in the dump, "
                   f"{expected.get('expert', '') or 'the single DiT'} now)")
    return out


@dataclass
class CalibrationDump:
    """The first block's positional arguments, one tuple per denoiser call, and each call's timestep."""

    samples: list[tuple]
    timesteps: list[float]
    fingerprint: dict[str, Any]

    def save(self, path: Path) -> None:
        """Written atomically: a run killed while writing leaves no half dump for the next run to trust."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save({"format": DUMP_FORMAT, "fingerprint": self.fingerprint, "samples": self.samples,
                    "timesteps": self.timesteps}, tmp)
        os.replace(tmp, path)


def read_dump(path: Path, expected: dict[str, Any]) -> CalibrationDump:
    """The dump at `path`, refused unless it was captured from this pipeline with these sampling settings."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises several types for a damaged or foreign file
        raise InvalidDatasetError(f"{path} is not a readable calibration dump ({type(exc).__name__}: {exc}); "
                                  f"delete it to capture the calibration data again") from None
    if not isinstance(data, dict) or data.get("format") != DUMP_FORMAT:
        raise InvalidDatasetError(f"{path} is not a calibration dump of this version (format {DUMP_FORMAT}); delete "
                                  f"it to capture the calibration data again, or set dump_data_dir elsewhere")
    differences = fingerprint_differences(expected, data.get("fingerprint") or {})
    if differences:
        raise InvalidDatasetError(f"{path} was captured from another model or sampling configuration: "
                                  f"{'; '.join(differences)} differ. Delete it to capture again, or set "
                                  f"multimodal_sd_config.dump_config.dump_data_dir to another folder")
    return CalibrationDump(list(data["samples"]), list(data["timesteps"]), data["fingerprint"])


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, (tuple, list)):
        return tuple(_detached(v) for v in value)
    return value


def positional_arguments(block: nn.Module, args: tuple, kwargs: dict) -> tuple:
    """The block's arguments as positional ones (`capture_mode: args`), in its forward's parameter order, defaults
    filled in: FLUX.1 and Qwen-Image call their blocks with keywords, and the walk calls block(*args). A keyword
    that has no positional place (after `*args`) cannot be replayed so: refused by name."""
    if not kwargs:
        return args
    try:
        bound = inspect.signature(block.forward).bind(*args, **kwargs)
    except TypeError as exc:
        raise InvalidDatasetError(f"the DiT block's arguments do not match its forward ({exc})") from None
    bound.apply_defaults()
    if bound.kwargs:
        raise InvalidDatasetError(f"the DiT block was called with keyword-only arguments {sorted(bound.kwargs)}; "
                                  f"capture_mode 'args' keeps positional ones")
    return bound.args


@torch.no_grad()
def capture_block_inputs(targets: Mapping[str, tuple[nn.Module, nn.Module]], sample: Callable[[int], None],
                         runs: int, fingerprints: Mapping[str, dict[str, Any]]) -> dict[str, CalibrationDump]:
    """Run `sample(i)` for i < runs (one float sampling each) and keep, for each {expert: (denoiser, first block)},
    the first-block arguments of every call the pipeline makes to that expert, with the call's timestep."""
    dumps = {name: CalibrationDump([], [], fingerprints[name]) for name in targets}
    hooks = []
    for name, (denoiser, first_block) in targets.items():
        current: dict[str, Optional[float]] = {"t": None}  # this expert's own: a call sets it, its blocks read it

        def on_denoiser(_module, args, kwargs, current=current):
            t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
            current["t"] = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else None

        def on_block(module, args, kwargs, current=current, dump=dumps[name]):
            dump.samples.append(_detached(positional_arguments(module, args, kwargs)))
            dump.timesteps.append(current["t"])

        hooks += [denoiser.register_forward_pre_hook(on_denoiser, with_kwargs=True),
                  first_block.register_forward_pre_hook(on_block, with_kwargs=True)]
    try:
        for i in range(runs):
            sample(i)
    finally:
        for hook in hooks:
            hook.remove()
    for name, dump in dumps.items():
        if not dump.samples:
            what = f"expert {name}" if len(dumps) > 1 else "the DiT"
            raise InvalidDatasetError(f"sampling never called the first block of {what}: no calibration data was "
                                      f"captured for it" + (" (raise inference_config.sample_steps so that both sides "
                                                            "of the boundary get steps)" if len(dumps) > 1 else ""))
        log.info("captured %d calls of %s (%d sampling runs)", len(dump.samples), name, runs)
    return dumps
