"""The catalog of a checkpoint that `modelslim_convert` reads (app/convert_weights.py), and its `preprocess`: every
tensor by name with its stored dtype and shape (headers only), renamed, or reshaped between stacked experts
[E, A, B] and one weight per expert and projection. Reshaped tensors stay descriptions of what to read
(`read_stored`), so nothing is read before the plan is checked, and a chunked expert reads only its slice."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional

import torch

from msmodelslim.core.convert_config import Chunk, ConvertConfig, StructureStep
from msmodelslim.core.errors import ConfigError, InvalidModelError, UnsupportedError
from msmodelslim.model.checkpoint import STORED_DTYPES, SafetensorsCheckpoint


@dataclass(frozen=True)
class ExpertPart:
    """One expert's part of a stacked experts tensor [E, A, B] (preprocess chunk): [expert], split along `dim`
    (1 or 2, of the stacked tensor) into `parts`, part `index`."""

    expert: int
    index: int
    parts: int
    dim: int


@dataclass(frozen=True)
class StoredTensor:
    key: str  # its name in the checkpoint (before preprocess renames it)
    dtype: Optional[torch.dtype]  # None: a pack-quantized weight (its parts read together)
    shape: tuple[int, ...]
    part: Optional[ExpertPart] = None  # a slice of the stacked tensor `key`
    # preprocess merge: per expert, the tensors concatenated along `merge_dim`; the experts stacked
    merged: tuple[tuple["StoredTensor", ...], ...] = ()
    merge_dim: int = 0

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) // 2 if self.dtype is None else math.prod(self.shape) * self.dtype.itemsize


def read_catalog(checkpoint: SafetensorsCheckpoint) -> dict[str, StoredTensor]:
    """Every tensor of the checkpoint (headers only; a pack-quantized weight as one `X.weight`, its shape from
    `X.weight_shape`)."""
    catalog = {}
    for key in checkpoint.names():
        if checkpoint.is_packed(key):
            catalog[key] = StoredTensor(key, None, checkpoint.shape(key))
            continue
        dtype = STORED_DTYPES.get(checkpoint.stored_dtype(key))
        if dtype is None:
            raise InvalidModelError(f"tensor {key} is stored as {checkpoint.stored_dtype(key)}, which this version "
                                    f"does not read")
        catalog[key] = StoredTensor(key, dtype, checkpoint.shape(key))
    return catalog


def _captures(name: str, pattern: str) -> Optional[tuple[str, ...]]:
    """What each '*' of `pattern` matched in `name` (any run of characters), None when it does not match."""
    regex = "^" + "(.*?)".join(re.escape(part) for part in pattern.split("*")) + "$"
    found = re.match(regex, name)
    return found.groups() if found else None


def _filled(pattern: str, values: tuple[str, ...]) -> str:
    """`pattern` with its '*'s replaced by `values` in order."""
    pieces = pattern.split("*")
    if len(values) != len(pieces) - 1:
        raise ConfigError(f"pattern {pattern!r} has {len(pieces) - 1} '*', but {len(values)} value(s) fill it")
    return pieces[0] + "".join(v + p for v, p in zip(values, pieces[1:]))


def _num_experts(config: dict) -> int:
    config = {**(config.get("text_config") or {}), **config}
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if isinstance(config.get(key), int):
            return config[key]
    raise InvalidModelError("config.json has no num_experts (nor num_local_experts, n_routed_experts); splitting "
                            "stacked experts needs it")


def _chunked(tensors: dict[str, StoredTensor], step: StructureStep, where: str, config: dict
             ) -> dict[str, StoredTensor]:
    """preprocess convert with a chunk: every stacked tensor a source pattern names, as per-expert parts."""
    chunk = step.ops[0]
    out: dict[str, StoredTensor] = {}
    matched = False
    experts = None
    for name, stored in tensors.items():
        captures = next((c for pattern in step.source if (c := _captures(name, pattern)) is not None), None)
        if captures is None:
            out[name] = stored
            continue
        matched = True
        experts = experts or _num_experts(config)
        if len(stored.shape) != 3 or stored.shape[0] != experts or stored.dtype is None or stored.part is not None \
                or stored.merged or stored.shape[chunk.dim] % len(chunk.projections):
            raise UnsupportedError(f"{where}: {name} has shape {list(stored.shape)}; chunk splits a stacked experts "
                                   f"tensor [{experts} experts, A, B] along dim {chunk.dim} into "
                                   f"{len(chunk.projections)} equal parts")
        shape = list(stored.shape[1:])
        shape[chunk.dim - 1] //= len(chunk.projections)
        for expert in range(experts):
            for index, target in enumerate(step.target):
                new = _filled(target, captures + (str(expert),))
                if new in out or new in tensors:
                    raise ConfigError(f"{where}: two tensors would be named {new!r}")
                out[new] = StoredTensor(stored.key, stored.dtype, tuple(shape),
                                        ExpertPart(expert, index, len(chunk.projections), chunk.dim))
    if not matched:
        raise ConfigError(f"{where}: source {step.source} names no tensor of the checkpoint")
    return out


def _merged(tensors: dict[str, StoredTensor], step: StructureStep, where: str, config: dict
            ) -> dict[str, StoredTensor]:
    """preprocess convert with a merge: per layer, the per-expert weights the source patterns name (their last '*'
    the expert index), concatenated along the op's dim and stacked over the experts under the target's name."""
    merge = step.ops[0]
    groups: dict[tuple[str, ...], dict[int, list[Optional[StoredTensor]]]] = {}
    out: dict[str, StoredTensor] = {}
    for name, stored in tensors.items():
        found = next(((i, c) for i, pattern in enumerate(step.source)
                      if (c := _captures(name, pattern)) is not None), None)
        if found is None:
            out[name] = stored
            continue
        index, captures = found
        if not captures or not captures[-1].isdigit():
            raise ConfigError(f"{where}: the last '*' of {step.source[index]!r} must match the expert index; in "
                              f"{name} it matched {captures[-1] if captures else 'nothing'!r}")
        parts = groups.setdefault(captures[:-1], {}).setdefault(int(captures[-1]), [None] * len(step.source))
        parts[index] = stored
    if not groups:
        raise ConfigError(f"{where}: source {step.source} names no tensor of the checkpoint")
    experts = _num_experts(config)
    for captures, by_expert in groups.items():
        new = _filled(step.target[0], captures)
        lacking = sorted(set(range(experts)) - set(by_expert)) or [e for e, p in by_expert.items() if None in p]
        if lacking or len(by_expert) != experts:
            raise UnsupportedError(f"{where}: {new} needs every pattern of {step.source} for experts 0 to "
                                   f"{experts - 1}; expert {lacking[0] if lacking else max(by_expert)} is incomplete "
                                   f"or out of range")
        stacked = tuple(tuple(by_expert[e]) for e in range(experts))
        pieces = [p for parts in stacked for p in parts]
        if any(len(p.shape) != 2 or p.dtype is None or p.dtype != pieces[0].dtype for p in pieces):
            raise UnsupportedError(f"{where}: {new}: merge stacks 2-D weights of one float dtype")
        shape = list(stacked[0][0].shape)
        shape[merge.dim] = sum(p.shape[merge.dim] for p in stacked[0])
        if any(p.shape[1 - merge.dim] != shape[1 - merge.dim] for p in pieces) or \
                any(sum(p.shape[merge.dim] for p in parts) != shape[merge.dim] for parts in stacked):
            raise UnsupportedError(f"{where}: {new}: the weights do not line up along dim {merge.dim}")
        if new in out:
            raise ConfigError(f"{where}: two tensors would be named {new!r}")
        out[new] = StoredTensor(pieces[0].key, pieces[0].dtype, (experts, *shape), merged=stacked,
                                merge_dim=merge.dim)
    return out


def apply_preprocess(catalog: dict[str, StoredTensor], config: ConvertConfig, model_config: dict
                     ) -> dict[str, StoredTensor]:
    tensors = dict(catalog)
    for i, step in enumerate(config.spec.preprocess):
        where = f"spec.preprocess[{i}]"
        if isinstance(step, StructureStep):
            reshape = _chunked if isinstance(step.ops[0], Chunk) else _merged
            tensors = reshape(tensors, step, where, model_config)
            continue
        renamed: dict[str, StoredTensor] = {}
        for name, stored in tensors.items():
            matched = next(((p, c) for p in step.patterns if (c := _captures(name, p.source)) is not None), None)
            new = _filled(matched[0].to, matched[1]) if matched else name
            if new in renamed:
                raise ConfigError(f"{where}: two tensors would be named {new!r}")
            renamed[new] = stored
        tensors = renamed
    return tensors


def read_stored(checkpoint: SafetensorsCheckpoint, stored: StoredTensor) -> torch.Tensor:
    """The tensor `stored` describes: as stored, one expert's part of a stacked tensor, or merged experts."""
    if stored.merged:  # per-expert weights concatenated, then stacked over the experts
        return torch.stack([torch.cat([read_stored(checkpoint, p) for p in parts], stored.merge_dim)
                            for parts in stored.merged])
    if stored.part is not None:  # one expert's part of a stacked tensor
        part = stored.part
        expert = checkpoint.read_index(stored.key, part.expert)
        return expert.chunk(part.parts, part.dim - 1)[part.index].contiguous()
    return checkpoint.read_stored([stored.key])[stored.key]
