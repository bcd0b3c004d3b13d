"""Read a quantized diffusion pipeline back (app/diffusion.py writes it): the DiT from `transformer/` (one per
expert folder for Wan2.2: high_noise_model/, low_noise_model/; ascendv1:
quant_model_description.json + quant_model_weights*.safetensors, or MindIE: quant_model_description_<type>.json +
quant_model_weight_<type>*.safetensors; with the diffusers config.json), the other components from their folders
as diffusers saved them.

The DiT is built from its config.json on the meta device; each quantized linear becomes a `QuantLinear`
(ir/quant_linear.py) rebuilt from the saved tensors alone (`linear_from_tensors`, the inverse of the writer's
layout), whose forward computes what the serving kernel computes (W8A8_DYNAMIC: per-token int8 activations,
int8 weights with per-channel scales; MX: E8M0 blocks of 32); every other tensor is loaded as saved. Attention
quantization and rotations are put back where the DiT attention wiring reads them (model/diffusion/attention.py):
online rotations from their FLOAT matrices `<attn>.q_rot` / `<attn>.k_rot`, static FA3 from the FAQuant scales,
dynamic FA3 from `<attn>.quant_type` (format/ascendv1/fa3.py). A linear saved under `<p>.linear.*` with
`<p>.div.mul_scale` (non-fusion smoothing) is wrapped in a `NonFusionSmooth` (ir/non_fusion_smooth.py).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from msmodelslim.core.errors import InvalidModelError
from msmodelslim.format.ascendv1.reader import (dynamic_fa3, quantized_layers, read_tensors, read_valid_description,
                                                require_described_tensors, take_fa3, tensors_by_layer)
from msmodelslim.format.ascendv1.tensors import REQUIRED_SUFFIXES, linear_from_tensors
from msmodelslim.format.staging import incomplete_reason
from msmodelslim.ir.non_fusion_smooth import DIVISION, NonFusionSmooth
from msmodelslim.model.diffusion.attention import ROTATION_SLOTS, set_slot
from msmodelslim.model.diffusion.dit import prebuilt_components
from msmodelslim.model.diffusion.wan import DiffusionFamily, dtype_kwargs, stored_dtype
from msmodelslim.processor.online_quarot.rotation import OnlineRotation


def load_quantized_denoiser(folder: Path, family: DiffusionFamily) -> nn.Module:
    """The DiT saved in `folder` (save_path/transformer), quantized linears as QuantLinear."""
    import diffusers
    from accelerate import init_empty_weights

    description = read_valid_description(folder)  # ascendv1's, or the folder's one MindIE description
    require_described_tensors(folder, description, "--quant_path")
    cls = getattr(diffusers, family.components[family.denoiser][1][0])
    try:
        config = cls.load_config(str(folder))
    except (OSError, ValueError) as exc:
        raise InvalidModelError(f"{folder}: the DiT's config.json is unreadable: {exc}") from None
    with init_empty_weights():
        model = cls.from_config(config)
    model.eval()
    dynamic = dynamic_fa3(folder, description)  # a quant_type it cannot simulate is refused before the tensors
    tensors = read_tensors(folder)
    attention_parts = _take_rotations(folder, model, tensors)
    _wrap_non_fusion_smoothing(folder, model, tensors)
    for attention, branches in {**take_fa3(folder, description, tensors), **dynamic}.items():
        attention_parts.setdefault(attention, {}).update(branches)
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
    for attention_name, parts in attention_parts.items():
        attention = _attention(folder, model, attention_name)
        for slot, module in parts.items():
            set_slot(attention, slot, module)
    return model


def _wrap_non_fusion_smoothing(folder: Path, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Each `<p>.div.mul_scale` (non-fusion smoothing, ir/non_fusion_smooth.py) wraps the DiT's linear `<p>`, whose
    tensors are then read under `<p>.linear.*`."""
    suffix = f".{DIVISION}.mul_scale"
    for name in [n for n in tensors if n.endswith(suffix)]:
        prefix = name.removesuffix(suffix)
        parent_name, _, child = prefix.rpartition(".")
        try:
            linear = model.get_submodule(prefix)
        except AttributeError:
            linear = None
        if not isinstance(linear, nn.Linear):
            raise InvalidModelError(f"{folder}: {name} divides the input of {prefix}, which is not a linear of the "
                                    f"DiT in config.json")
        mul_scale = tensors[name]  # loaded with the other tensors (load_state_dict below)
        if mul_scale.shape != (linear.in_features,):
            raise InvalidModelError(f"{folder}: {name} has shape {list(mul_scale.shape)}; {prefix} reads "
                                    f"{linear.in_features} channels")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, NonFusionSmooth(linear, mul_scale))


def _attention(folder: Path, model: nn.Module, name: str) -> nn.Module:
    try:
        attention = model.get_submodule(name)
    except AttributeError:
        attention = None
    if attention is None or not hasattr(attention, "processor"):
        raise InvalidModelError(f"{folder}: the description quantizes or rotates the attention {name}, which the DiT "
                                f"in config.json does not have")
    return attention


def _take_rotations(folder: Path, model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, dict]:
    """{attention: {q_rot/k_rot: OnlineRotation}} from the FLOAT matrices saved under the site's name, which are
    removed from `tensors` (the DiT has no such parameter)."""
    out: dict[str, dict] = {}
    for name in [n for n in tensors if n.rpartition(".")[2] in ROTATION_SLOTS]:
        attention, _, slot = name.rpartition(".")
        matrix = tensors.pop(name).float()
        _attention(folder, model, attention)
        try:
            out.setdefault(attention, {})[slot] = OnlineRotation(matrix)
        except ValueError as exc:
            raise InvalidModelError(f"{folder}: {name}: {exc}") from None
    return out


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
                                            **prebuilt_components(family, path), **denoisers).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
