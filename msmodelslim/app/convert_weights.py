"""Use case: `msmodelslim quant --config_path <apiversion: modelslim_convert>`: convert a checkpoint's linear
weights offline, with no model code and no calibration data (core/convert_config.py has the protocol).

The source is read as safetensors headers first (the catalog; a compressed-tensors pack-quantized weight is one
`X.weight` there), reshaped by `preprocess` (renamed keys; stacked experts chunked into one weight per expert
and projection, read one expert at a time, or per-expert weights merged into stacked ones), and every linear
that a `match` names gets its source IR from what is stored: pack-quantized is INT4_PACKED; a float8 weight, or
one with a `weight_scale_inv` beside it, is FP8_BLOCK (the block from config.json's
quantization_config.weight_block_size, 128 x 128 by default); bf16/fp16/fp32 is FLOAT. Every check (paths,
the plan, a route for every linear, the disk's room) runs before a tensor is read. Then the tensors stream
through, one at a time, into a staged output that is moved into place only when complete and checked:
- FP8_BLOCK / INT4_PACKED -> FLOAT: dequantized in float32 (w · scale_inv of its block; compressed-tensors' own
  decompressor) and stored in the checkpoint's float dtype (config.json dtype; bfloat16 when it names none);
- FLOAT -> W8A8_MXFP8: the MXFP8 round to nearest of linear_quant (weight_scale in E8M0, blocks of 32 along the
  input), the same codes `quant` writes for that scheme;
- tensors that no rule matches are written unchanged.
ascendv1 output: quant_model_description.json (converted linears tagged with their type, the rest FLOAT, a tied
head described as lm_head.weight); Hugging Face output: model*.safetensors and config.json without the source's
quantization_config (every quantized linear must be converted)."""
from __future__ import annotations

import fnmatch
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from msmodelslim.core.convert_config import Chunk, ConvertConfig, IRKind, StructureStep, shortest_route
from msmodelslim.core.errors import ConfigError, FormatCheckError, InvalidModelError, UnsupportedError
from msmodelslim.core.logging import get_logger
from msmodelslim.format.ascendv1.checker import check_ascendv1
from msmodelslim.format.ascendv1.writer import AscendV1Writer
from msmodelslim.format.disk_space import check_free_space
from msmodelslim.format.hf_files import copy_model_files
from msmodelslim.format.shards import ShardStream
from msmodelslim.format.staging import check_save_path, staged_directory
from msmodelslim.model.checkpoint import (FP8_DTYPES, STORED_DTYPES, SafetensorsCheckpoint, dequantize_fp8_blocks,
                                         read_json)
from msmodelslim.model.packed_checkpoint import open_checkpoint
from msmodelslim.processor.linear_quant.config import LinearQuantConfig
from msmodelslim.processor.linear_quant.processor import linear_to_ir

log = get_logger("app.convert_weights")

FLOAT_DTYPES = {torch.bfloat16, torch.float16, torch.float32}
DEFAULT_FP8_BLOCK = (128, 128)
MXFP8 = {"dtype": "mxfp8", "scope": "per_block", "symmetric": True, "method": "minmax"}
W8A8_MXFP8_CONFIG = LinearQuantConfig.model_validate({"type": "linear_quant",
                                                      "qconfig": {"weight": MXFP8, "act": MXFP8}})
SCALE = ".weight_scale_inv"
BEST_PRACTICE = "convert_best_practice.yaml"  # as the established tool names a convert run's saved practice


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


@dataclass
class Conversion:
    """One linear: its source IR and the route to its target."""

    module: str
    route: list[IRKind]
    out_features: int = 0
    in_features: int = 0


@dataclass
class ConvertPlan:
    checkpoint: SafetensorsCheckpoint
    config: dict  # config.json, as JSON
    tensors: dict[str, StoredTensor]  # by their names after preprocess
    conversions: dict[str, Conversion] = field(default_factory=dict)  # by module name
    float_dtype: torch.dtype = torch.bfloat16
    fp8_block: tuple[int, int] = DEFAULT_FP8_BLOCK

    def lines(self) -> list[str]:
        routes: dict[str, int] = {}
        for c in self.conversions.values():
            key = " -> ".join(r.value for r in c.route)
            routes[key] = routes.get(key, 0) + 1
        kept = len(self.tensors) - sum(1 + (f"{m}{SCALE}" in self.tensors) for m in self.conversions)
        return ([f"{count:6d} linears {route}" for route, count in sorted(routes.items())]
                + [f"{kept:6d} other tensors written unchanged"])


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


def _float_dtype(config: dict) -> tuple[torch.dtype, tuple[int, int]]:
    """The checkpoint's float dtype (config.json torch_dtype/dtype; bfloat16 otherwise) and its FP8 block."""
    name = config.get("torch_dtype") or config.get("dtype") or "bfloat16"
    dtype = getattr(torch, str(name), None)
    dtype = dtype if dtype in FLOAT_DTYPES else torch.bfloat16
    block = (config.get("quantization_config") or {}).get("weight_block_size") or DEFAULT_FP8_BLOCK
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise InvalidModelError(f"config.json quantization_config.weight_block_size {block!r} is not two positive "
                                f"integers")
    return dtype, (block[0], block[1])


def source_ir(module: str, tensors: dict[str, StoredTensor], block: tuple[int, int]) -> IRKind:
    """What the checkpoint stores for `module` (route: auto), checked against its scale's shape."""
    weight = tensors[f"{module}.weight"]
    if len(weight.shape) != 2:
        raise UnsupportedError(f"{module}.weight has shape {list(weight.shape)}; a linear's weight is 2-D (split "
                               f"stacked experts first with a preprocess step of type convert, op chunk)")
    if weight.dtype is None:
        return IRKind.INT4_PACKED
    scale = tensors.get(f"{module}{SCALE}")
    if weight.dtype in FP8_DTYPES or scale is not None:
        if scale is None or weight.dtype not in FP8_DTYPES:
            raise UnsupportedError(f"{module}: a {weight.dtype} weight {'with' if scale else 'without'} "
                                   f"weight_scale_inv is no FP8_BLOCK linear (float8 codes with block scales)")
        expected = tuple(math.ceil(n / b) for n, b in zip(weight.shape, block))
        if scale.shape != expected:
            raise InvalidModelError(f"{module}{SCALE} has shape {list(scale.shape)}, but blocks of {list(block)} over "
                                    f"a {list(weight.shape)} weight make {list(expected)}")
        return IRKind.FP8_BLOCK
    if weight.dtype in FLOAT_DTYPES:
        return IRKind.FLOAT
    raise UnsupportedError(f"{module}.weight is {weight.dtype}: no source IR this version reads (FLOAT: bf16/fp16/"
                           f"fp32; FP8_BLOCK: float8 with weight_scale_inv; INT4_PACKED: compressed-tensors "
                           f"pack-quantized)")


def plan_conversion(config: ConvertConfig, model_path: Path) -> ConvertPlan:
    """Everything decided from the headers: which linear goes which route (ConfigError/UnsupportedError else)."""
    config_file = model_path / "config.json"
    model_config = read_json(config_file) if config_file.is_file() else {}  # as JSON: no model code
    float_dtype, block = _float_dtype(model_config)
    checkpoint = open_checkpoint(model_path)
    plan = ConvertPlan(checkpoint, model_config, apply_preprocess(read_catalog(checkpoint), config, model_config),
                       float_dtype=float_dtype, fp8_block=block)
    # a linear's weight is 2-D: norms and other vectors a broad pattern names are not linears and stay as they are
    modules = [n.removesuffix(".weight") for n, t in plan.tensors.items() if n.endswith(".weight") and len(t.shape) > 1]
    for i, rule in enumerate(config.spec.linears):
        matched = [m for m in modules if any(fnmatch.fnmatchcase(m, p) for p in rule.match)]
        if not matched:
            raise ConfigError(f"spec.linears[{i}].match {rule.match} names no weight of the checkpoint (module names "
                              f"such as {', '.join(modules[:3])})")
        for module in matched:
            if module in plan.conversions:
                continue  # the first rule that names a linear decides, as in linear_quant's groups
            source = source_ir(module, plan.tensors, block)
            route = shortest_route(source, rule.target) if rule.route == "auto" else list(rule.route)
            if route is None or route[0] != source:
                how = "no implemented conversion leads" if route is None else f"route starts at {route[0].value}"
                raise UnsupportedError(f"spec.linears[{i}]: {module} is {source.value} in the checkpoint; {how} from "
                                       f"{source.value} to {rule.target.value}")
            out_features, in_features = plan.tensors[f"{module}.weight"].shape
            plan.conversions[module] = Conversion(module, route, out_features, in_features)
    return plan


def _refuse_partial_conversion(plan: ConvertPlan) -> None:
    """Quantized linears (FP8 block, pack-quantized int4) that no rule converts would stay under a config.json
    quantization_config that no longer describes the checkpoint, and ascendv1 has no type for them."""
    modules = [n.removesuffix(".weight") for n, t in plan.tensors.items() if n.endswith(".weight") and
               len(t.shape) == 2 and (t.dtype is None or t.dtype in FP8_DTYPES)]
    left = [m for m in modules if m not in plan.conversions]
    if left:
        raise UnsupportedError(f"{len(left)} quantized linear(s) of the checkpoint no rule converts "
                               f"({', '.join(left[:3])}...): a partly converted checkpoint would keep a "
                               f"quantization_config that no longer describes it; add them to a linears match")


def output_bytes(plan: ConvertPlan) -> int:
    """What the output needs on disk (tensor bytes; headers and small files aside)."""
    total = 0
    consumed = set()
    for module, c in plan.conversions.items():
        elements = c.out_features * c.in_features
        consumed.update({f"{module}.weight", f"{module}{SCALE}"})
        total += elements + elements // 32 if c.route[-1] == IRKind.W8A8_MXFP8 else \
            elements * torch.finfo(plan.float_dtype).bits // 8
    for name, stored in plan.tensors.items():
        if name not in consumed:
            total += stored.nbytes
    return total


def _as_float(c: Conversion, plan: ConvertPlan) -> torch.Tensor:
    """The linear's FLOAT IR: its weight in the checkpoint's float dtype, as a float checkpoint stores it
    (dequantized in float32 first where it is stored quantized)."""
    name = f"{c.module}.weight"
    if c.route[0] == IRKind.FP8_BLOCK:
        weight = dequantize_fp8_blocks(_read(plan, name), _read(plan, f"{c.module}{SCALE}"), plan.fp8_block, c.module)
        return weight.to(plan.float_dtype)
    if c.route[0] == IRKind.INT4_PACKED:  # compressed-tensors' own decompressor (model/packed_checkpoint.py)
        key = plan.tensors[name].key
        return plan.checkpoint.load([key])[key].to(plan.float_dtype)
    return _read(plan, name)


def _converted(c: Conversion, plan: ConvertPlan, bias: Optional[torch.Tensor]):
    """The linear at the end of its route: a float tensor (FLOAT) or a QuantLinear (W8A8_MXFP8). Every route is
    the source, FLOAT (unless it is the source), then W8A8_MXFP8 if that is the target (core/convert_config.py
    EDGES)."""
    value = _as_float(c, plan)
    if c.route[-1] != IRKind.W8A8_MXFP8:
        return value
    linear = nn.Linear(c.in_features, c.out_features, bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(value, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    return linear_to_ir(linear, W8A8_MXFP8_CONFIG, None)


def _read(plan: ConvertPlan, name: str) -> torch.Tensor:
    return _read_stored(plan.checkpoint, plan.tensors[name])


def _read_stored(checkpoint: SafetensorsCheckpoint, stored: StoredTensor) -> torch.Tensor:
    if stored.merged:  # per-expert weights concatenated, then stacked over the experts
        return torch.stack([torch.cat([_read_stored(checkpoint, p) for p in parts], stored.merge_dim)
                            for parts in stored.merged])
    if stored.part is not None:  # one expert's part of a stacked tensor
        part = stored.part
        expert = checkpoint.read_index(stored.key, part.expert)
        return expert.chunk(part.parts, part.dim - 1)[part.index].contiguous()
    return checkpoint.read_stored([stored.key])[stored.key]


def _describe_tied_head(plan: ConvertPlan, writer: AscendV1Writer) -> None:
    """The engines look up lm_head.weight in the description even where it is the input embedding (tied): a tied
    checkpoint, which stores no head, gets the table a second time under that name, as `quant` writes it."""
    config = plan.config
    tied = config.get("tie_word_embeddings", (config.get("text_config") or {}).get("tie_word_embeddings"))
    if not tied or "lm_head.weight" in plan.tensors:
        return
    tables = [n for n in plan.tensors if n.endswith("embed_tokens.weight")]
    if len(tables) != 1:
        found = "no *embed_tokens.weight is stored" if not tables else f"{len(tables)} are stored"
        log.warning("config.json ties the output head to the input embedding, but %s; the description names no "
                    "lm_head.weight", found)
        return
    writer.add_tied("lm_head.weight", tables[0], _read(plan, tables[0]))


def write_converted(plan: ConvertPlan, ascendv1: bool, part_file_size_gb: int, out_dir: Path, model_path: Path
                    ) -> dict:
    """Stream every tensor into `out_dir`, converted where the plan says; ascendv1: the description written with
    the model's files (returned), else only the shards and their index."""
    shards = None
    writer = None
    if ascendv1:
        writer = AscendV1Writer(out_dir, part_file_size_gb, plan.float_dtype, lambda name: False,
                                lambda name: plan.float_dtype)
    else:
        shards = ShardStream(out_dir, int(part_file_size_gb * 2**30))
    add_float = writer.add_passthrough if writer else shards.add
    consumed = {f"{m}{suffix}" for m in plan.conversions for suffix in (SCALE, ".bias")}
    # in the checkpoint's order of files, so that a file's pages are read once, front to back
    for name in sorted(plan.tensors, key=lambda n: (plan.checkpoint.file_of(plan.tensors[n].key), n)):
        if name in consumed:
            continue
        module = name.removesuffix(".weight")
        conversion = plan.conversions.get(module) if name.endswith(".weight") else None
        if conversion is None:
            add_float(name, _read(plan, name))
            continue
        bias = _read(plan, f"{module}.bias") if f"{module}.bias" in plan.tensors else None
        result = _converted(conversion, plan, bias)
        if isinstance(result, torch.Tensor):
            add_float(name, result)
            if bias is not None:
                add_float(f"{module}.bias", bias)
        else:  # a QuantLinear, written as `quant` writes one (the description's group size included)
            writer.add_module_tree(module, result)
    if writer is not None:
        _describe_tied_head(plan, writer)
        return writer.finish(model_path)
    if shards.limit == 0:
        shards.finish(lambda i, n: "model.safetensors", None)
    else:
        shards.finish(lambda i, n: f"model-{i:05d}-of-{n:05d}.safetensors", "model.safetensors.index.json")
    return {}


@dataclass
class ConvertReport:
    save_path: Path
    plan: ConvertPlan
    description: dict = field(default_factory=dict)


def convert_checkpoint(config: ConvertConfig, config_path: Path, model_path: Path, save_path: Path,
                       overwrite: bool = False, dry_run: bool = False) -> ConvertReport:
    """The whole use case: checks and plan from the headers, then (unless `dry_run`) the staged output."""
    if not model_path.is_dir():
        raise InvalidModelError(f"--model_path {model_path} is not a directory (a Hugging Face checkpoint)")
    check_save_path(save_path, overwrite, model_path, dry_run=dry_run)
    spec = config.spec
    if spec.defaults:
        raise UnsupportedError("spec.defaults of modelslim_convert is not implemented yet; write each rule in "
                               "spec.linears")
    save = spec.save[0]
    plan = plan_conversion(config, model_path)
    _refuse_partial_conversion(plan)
    check_free_space(save_path, output_bytes(plan), overwrite)
    for line in plan.lines():
        log.info("convert plan: %s", line.strip())
    if spec.parallel.workers > 1:
        log.info("spec.parallel.workers %d: this version converts in one process, one tensor at a time",
                 spec.parallel.workers)
    report = ConvertReport(save_path, plan)
    if dry_run:
        return report
    with staged_directory(save_path, overwrite) as staging:
        if save.ascendv1:
            report.description = write_converted(plan, True, save.part_file_size, staging, model_path)
            errors = [f.message for f in check_ascendv1(staging, None) if f.level == "error"]
            if errors:
                raise FormatCheckError("the converted checkpoint fails the ascendv1 checklist:\n  " +
                                       "\n  ".join(errors[:20]))
        else:
            write_converted(plan, False, save.part_file_size, staging, model_path)
            copy_model_files(model_path, staging)  # every quantized linear is float now: no quantization_config
        shutil.copyfile(config_path, staging / BEST_PRACTICE)
    log.info("converted %d linears into %s", len(plan.conversions), save_path)
    return report
