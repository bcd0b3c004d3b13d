"""The output side of a diffusion quantize run (app/diffusion.py): each DiT expert quantized layer-wise and written
into its folder (ascendv1 or mindie, online rotations included, checked against the format's checklist), and the
pipeline's other components copied unchanged."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from msmodelslim.core.errors import FormatCheckError
from msmodelslim.core.logging import get_logger
from msmodelslim.core.memory import release_free_heap
from msmodelslim.core.runner import process_block
from msmodelslim.core.sd_calibration import CalibrationDump
from msmodelslim.core.sd_config import SdPracticeConfig
from msmodelslim.format.ascendv1.checker import check_ascendv1
from msmodelslim.format.ascendv1.tensors import FLOAT
from msmodelslim.format.ascendv1.writer import AscendV1Writer
from msmodelslim.format.edits import OutputEdits
from msmodelslim.format.mindie import MindIEWriter
from msmodelslim.format.mindie_checker import check_mindie
from msmodelslim.ir.non_fusion_smooth import wrapper_name
from msmodelslim.model.diffusion.dit import block_list_names, block_walk, is_row_parallel, next_block_inputs
from msmodelslim.model.diffusion.wan import DiffusionFamily, Expert, stored_dtype
from msmodelslim.model.diffusion.weights import DenoiserWeights
from msmodelslim.model.interface import ProcessRequest
from msmodelslim.processor.base import Processor
from msmodelslim.processor.online_quarot.rotation import OnlineRotation

log = get_logger("app.diffusion")


def add_online_rotations(writer, block_name: str, block: nn.Module) -> None:
    """Every online rotation in the block as a FLOAT tensor named after its site (`<attn>.q_rot`, float32 [d, d]),
    the established format's online_quarot wrapper entry (protocol.md 4.4)."""
    for relative, module in block.named_modules():
        if isinstance(module, OnlineRotation):
            writer.add(f"{block_name}.{relative}", module.rotation.detach().float().cpu().contiguous(), FLOAT)


def processor_edits(processors: list[Processor]) -> OutputEdits:
    edits = OutputEdits()
    for processor in processors:
        edits = edits.merge(processor.output_edits())
    return edits


def quantize_and_write_expert(denoiser: nn.Module, family: DiffusionFamily, expert: Expert,
                              processors: list[Processor], dump: Optional[CalibrationDump], needs_data: bool,
                              config: SdPracticeConfig, model_path: Path, staging: Path, device: torch.device) -> dict:
    """Layer-wise: `denoiser` is the meta-device skeleton; each block's weights are read from the checkpoint,
    processed on `device`, written and released before the next block is read. Written into the expert's folder."""
    out_dir = staging / expert.folder
    out_dir.mkdir()
    weights = DenoiserWeights(model_path / expert.component)
    model_dtype = stored_dtype(model_path / expert.component)
    dtypes: dict[str, torch.dtype] = {}  # each float tensor is written in its stored dtype
    saver = config.spec.save[0]
    dtype_for = lambda name: dtypes.get(name, model_dtype)  # noqa: E731
    if saver.type == "mindie_format_saver":
        writer = MindIEWriter(out_dir, saver.part_file_size, dtype_for)
    else:
        writer = AscendV1Writer(out_dir, saver.part_file_size, model_dtype,
                                is_row_parallel=lambda name: is_row_parallel(family, wrapper_name(name)),
                                dtype_for=dtype_for)
    inputs = [tuple(_to(a, device) for a in args) for args in dump.samples] if needs_data else []
    blocks = block_walk(family, denoiser)  # every list of blocks, in the order the DiT calls them
    for i, (name, block) in enumerate(blocks):
        weights.materialize(block, name + ".")
        dtypes.update({f"{name}.{k}": t.dtype for k, t in block.state_dict().items()})
        block.to(device)
        requests = [ProcessRequest(name, block, args) for args in inputs]
        outputs = process_block(name, block, processors, requests)
        if needs_data and i + 1 < len(blocks):  # the next block's inputs: this block's outputs
            if outputs is None or len(outputs) < len(inputs):
                with torch.no_grad():
                    outputs = [block(*args) for args in inputs]
            inputs = [next_block_inputs(family, args, out) for out, args in zip(outputs, inputs)]
        add_online_rotations(writer, name, block)  # saved under the site's own name (not a module tensor)
        writer.add_module_tree(name, block)
        block.to("meta")  # written: its memory goes back before the next block is read
        release_free_heap()
        log.info("%s done (%d/%d)", name, i + 1, len(blocks))
    block_prefixes = tuple(f"{name}." for name in block_list_names(family))
    weights.materialize(denoiser, "", skip=block_prefixes)
    dtypes.update({k: t.dtype for k, t in denoiser.state_dict().items() if not k.startswith(block_prefixes)})
    for child_name, child in denoiser.named_children():
        if child_name not in block_list_names(family):
            writer.add_module_tree(child_name, child)
    for param_name, param in denoiser.named_parameters(recurse=False):
        writer.add_float(param_name, param.detach())
    description = writer.finish(model_path / expert.component, processor_edits(processors))
    check = check_ascendv1 if saver.type == "ascendv1_saver" else check_mindie
    errors = [f.message for f in check(out_dir) if f.level == "error"]
    if errors:
        raise FormatCheckError(f"the written DiT fails the {saver.type} checklist: {'; '.join(errors[:5])}")
    return description


def _to(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    return value


def copy_other_components(model_path: Path, staging: Path, family: DiffusionFamily) -> None:
    """model_index.json and every component folder but the denoisers', unchanged."""
    shutil.copyfile(model_path / "model_index.json", staging / "model_index.json")
    quantized = {e.component for e in family.experts}
    for component in family.components:
        if component not in quantized:
            shutil.copytree(model_path / component, staging / component)
