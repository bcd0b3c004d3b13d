"""Read a quantized diffusion pipeline back (app/diffusion.py writes it): the DiT from `transformer/` (one per
expert folder for Wan2.2: high_noise_model/, low_noise_model/; ascendv1:
quant_model_description.json + quant_model_weights*.safetensors, or MindIE: quant_model_description_<type>.json +
quant_model_weight_<type>*.safetensors; with the diffusers config.json), the other components from their folders
as diffusers saved them.

The DiT is built from its config.json on the meta device; each quantized linear becomes a `QuantLinear`
(ir/quant_linear.py) rebuilt from the saved tensors alone (`linear_from_tensors`, the inverse of the writer's
layout), whose forward computes what the serving kernel computes (W8A8_DYNAMIC: per-token int8 activations,
int8 weights with per-channel scales); every other tensor is loaded as saved.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from msmodelslim.core.errors import InvalidModelError
from msmodelslim.format.ascendv1.reader import (quantized_layers, read_tensors, read_valid_description,
                                                require_described_tensors, tensors_by_layer, validate_description)
from msmodelslim.format.ascendv1.writer import DESCRIPTION
from msmodelslim.model.checkpoint import read_json
from msmodelslim.format.ascendv1.tensors import REQUIRED_SUFFIXES, linear_from_tensors
from msmodelslim.format.staging import incomplete_reason
from msmodelslim.model.diffusion.wan import DiffusionFamily, dtype_kwargs, stored_dtype


def _read_description(folder: Path) -> dict:
    """ascendv1's quant_model_description.json, or MindIE's quant_model_description_<type>.json (format/mindie.py):
    the folder holds one saver's files."""
    if (folder / DESCRIPTION).is_file():
        return read_valid_description(folder)
    found = sorted(folder.glob("quant_model_description_*.json"))
    if len(found) != 1:
        raise InvalidModelError(f"{folder} holds {len(found)} MindIE descriptions and no {DESCRIPTION}; a quantized "
                                f"DiT folder holds exactly one description")
    description = read_json(found[0])
    validate_description(folder, description)
    return description


def load_quantized_denoiser(folder: Path, family: DiffusionFamily) -> nn.Module:
    """The DiT saved in `folder` (save_path/transformer), quantized linears as QuantLinear."""
    import diffusers
    from accelerate import init_empty_weights

    description = _read_description(folder)
    require_described_tensors(folder, description, "--quant_path")
    cls = getattr(diffusers, family.components[family.denoiser][1][0])
    try:
        config = cls.load_config(str(folder))
    except (OSError, ValueError) as exc:
        raise InvalidModelError(f"{folder}: the DiT's config.json is unreadable: {exc}") from None
    with init_empty_weights():
        model = cls.from_config(config)
    model.eval()
    tensors = read_tensors(folder)
    layers = quantized_layers(description)
    consumed: set[str] = set()
    for prefix, own in tensors_by_layer(tensors, layers).items():
        tag = layers[prefix]
        missing = sorted(REQUIRED_SUFFIXES[tag] - own.keys())
        if missing:
            raise InvalidModelError(f"{folder}: quantized layer {prefix} ({tag}) lacks tensor(s) "
                                    f"{', '.join(f'{prefix}.{m}' for m in missing)}")
        parent_name, _, child = prefix.rpartition(".")
        try:
            parent = model.get_submodule(parent_name)
            original = getattr(parent, child)
        except AttributeError:
            raise InvalidModelError(f"{folder}: the description names layer {prefix}, which the DiT in config.json "
                                    f"does not have") from None
        try:
            linear = linear_from_tensors(tag, own)
        except (ValueError, TypeError, IndexError, RuntimeError) as exc:
            raise InvalidModelError(f"{folder}: quantized layer {prefix} ({tag}) has inconsistent tensors: "
                                    f"{exc}") from None
        if isinstance(original, nn.Linear) and (linear.in_features, linear.out_features) != (
                original.in_features, original.out_features):
            raise InvalidModelError(f"{folder}: quantized layer {prefix} is [{linear.out_features}, "
                                    f"{linear.in_features}], config.json gives [{original.out_features}, "
                                    f"{original.in_features}]")
        setattr(parent, child, linear)
        consumed.update(f"{prefix}.{k}" for k in own)
    state = {k: v for k, v in tensors.items() if k not in consumed}
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:
        raise InvalidModelError(f"{folder}: tensors do not match the DiT in config.json: "
                                f"{' '.join(str(exc).split())[:400]}") from None
    missing = [k for k in result.missing_keys if k.rpartition(".")[0] not in layers]
    if missing or result.unexpected_keys:
        raise InvalidModelError(f"{folder}: tensors do not match the DiT in config.json (missing {missing[:5]}, "
                                f"unexpected {result.unexpected_keys[:5]})")
    return model


def load_quantized_pipeline(path: str | Path, family: DiffusionFamily, device: torch.device = torch.device("cpu"),
                            components: dict | None = None):
    """The diffusers pipeline saved at `path` with its quantized DiT(s), each expert's from its folder
    (`transformer/`, or Wan2.2's `high_noise_model/` and `low_noise_model/`). `components`: already loaded ones to share
    (e.g. the float pipeline's text encoder and VAE, which quantization leaves unchanged)."""
    import diffusers

    path = Path(path).expanduser().resolve()
    reason = incomplete_reason(path)
    if reason:
        raise InvalidModelError(f"{path} is not a complete checkpoint: {reason}")
    family.check_folder(path, saved=True)
    denoisers = {e.component: load_quantized_denoiser(path / e.folder, family).to(device) for e in family.experts}
    pipeline_cls = getattr(diffusers, family.pipeline_class)
    if components is not None:
        pipe = pipeline_cls(**{**components, **denoisers})
    else:
        dtype = stored_dtype(path / "text_encoder")
        pipe = pipeline_cls.from_pretrained(str(path), local_files_only=True, **dtype_kwargs(dtype),
                                            **denoisers).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
