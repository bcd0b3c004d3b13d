"""What every reader of a written checkpoint does around its quantized layers: read the shards, build the model the
writer wrote from (empty), and load the tensors that are not quantized layers' into it."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from torch import nn

from msmodelslim.core.errors import InvalidModelError
from msmodelslim.model.hf_config import load_hf_config, model_load_errors
from msmodelslim.model.moe import unfuse_experts
from msmodelslim.model.rebuild import Rebuilt, family_skeleton, same_name


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except Exception as exc:  # safetensors raises its own SafetensorError (and OSError) for a damaged file
            raise InvalidModelError(f"{file} is not a readable safetensors file: {exc}") from None
    return tensors


def tensor_names(path: Path, flag: str) -> set[str]:
    """Names of the tensors in `path`'s shards, from their headers only (no tensor data is read)."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise InvalidModelError(f"{flag} {path} holds no *.safetensors files; the checkpoint is incomplete")
    names: set[str] = set()
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                names.update(f.keys())
        except Exception as exc:  # safetensors raises its own SafetensorError (and OSError) for a damaged file
            raise InvalidModelError(f"{file} is not a readable safetensors file: {exc}") from None
    return names


def empty_model(path: Path, trust_remote_code: bool) -> Rebuilt:
    """The meta-device model as the writer's model was shaped. The family's adapter builds it where one is registered
    (experts per expert under their on-disk names, renamed modules, extra buffers); the generic build serves a
    model_type no registered adapter claims, with experts one per expert as both formats store them."""
    from transformers import AutoModelForCausalLM

    built = family_skeleton(path, trust_remote_code)
    if built is not None:
        return built._replace(model=built.model.eval())
    config = load_hf_config(path, trust_remote_code)
    with model_load_errors(path), init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=torch.float32)
    unfuse_experts(model)
    return Rebuilt(config, model.eval(), same_name)


def load_float_tensors(path: Path, model: nn.Module, config: Any, state: dict[str, torch.Tensor],
                       quantized: Iterable[str]) -> None:
    """Assign `state` (every tensor but the quantized layers' own, floats widened to float32) to `model`, whose
    `quantized` layer prefixes are already in place; a tensor the architecture lacks, or a missing one, is an
    error naming it. A tied head absent from the files is re-tied, as the loaders do."""
    quantized = set(quantized)
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:  # e.g. a float tensor whose shape is not the architecture's
        detail = " ".join(str(exc).split())[:400]
        raise InvalidModelError(f"{path}: tensors do not match the model architecture: {detail}") from None
    tied = getattr(config, "tie_word_embeddings", False)
    missing = [k for k in result.missing_keys if k.rpartition(".")[0] not in quantized
               and not (tied and k.endswith("lm_head.weight"))]  # a tied head may be stored once, as the table
    if result.unexpected_keys or missing:
        raise InvalidModelError(f"{path}: tensors do not match the model architecture "
                                f"(missing {missing[:5]}, unexpected {result.unexpected_keys[:5]})")
    if tied and "lm_head.weight" not in state:
        model.tie_weights()
