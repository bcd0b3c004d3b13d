"""Use case: `msmodelslim quant --config_path <apiversion: modelslim_convert>`: convert a checkpoint's linear
weights offline, with no model code and no calibration data (core/convert_config.py has the protocol).

The source is read as safetensors headers first (the catalog, app/convert_catalog.py; a compressed-tensors
pack-quantized weight is one `X.weight` there), reshaped by `preprocess` (renamed keys; stacked experts chunked
into one weight per expert and projection, read one expert at a time, or per-expert weights merged into stacked
ones), and every linear that a `match` names gets its source IR from what is stored: pack-quantized is
INT4_PACKED; a float8 weight, or one with a `weight_scale_inv` beside it, is FP8_BLOCK (the block from
config.json's quantization_config.weight_block_size, 128 x 128 by default); bf16/fp16/fp32 is FLOAT. Every check (paths,
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
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from msmodelslim.app.convert_catalog import StoredTensor, apply_preprocess, read_catalog, read_stored
from msmodelslim.core.convert_config import ConvertConfig, IRKind, shortest_route
from msmodelslim.core.errors import ConfigError, FormatCheckError, InvalidModelError, UnsupportedError
from msmodelslim.core.logging import get_logger
from msmodelslim.format.ascendv1.checker import check_ascendv1
from msmodelslim.format.ascendv1.writer import AscendV1Writer
from msmodelslim.format.disk_space import check_free_space
from msmodelslim.format.hf_files import copy_model_files
from msmodelslim.format.shards import ShardStream
from msmodelslim.format.staging import check_save_path, staged_directory
from msmodelslim.model.checkpoint import FP8_DTYPES, SafetensorsCheckpoint, dequantize_fp8_blocks, read_json
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
    return read_stored(plan.checkpoint, plan.tensors[name])


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
