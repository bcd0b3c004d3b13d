"""`apiversion: modelslim_convert`: offline, data-free conversion of a checkpoint's linear weights from one
representation (IR) to another, with no model code and no calibration data (protocol.md 2.9).

    apiversion: modelslim_convert
    spec:
      preprocess: [{type: rename, patterns: [{from: "a.*.b", to: "a.*.c"}]}]   # optional
      linears:
        - match: ["model.layers.*.self_attn.q_proj", "model.layers.*.mlp.*_proj"]
          target: W8A8_MXFP8            # or FLOAT
          route: auto                   # or an explicit path, e.g. [FP8_BLOCK, FLOAT, W8A8_MXFP8]
      save: [{type: ascend_v1, part_file_size: 4}]    # or huggingface / hf / compressed_tensors (FLOAT only)
      parallel: {workers: 1}

The IR graph has the edges the established tool registers: FP8_BLOCK -> FLOAT (block-scaled float8 weights with
`weight_scale_inv`, dequantized), INT4_PACKED -> FLOAT (compressed-tensors pack-quantized int4, dequantized) and
FLOAT -> W8A8_MXFP8 (quantized offline). The other IR names of the protocol are accepted as names; a rule that
needs a conversion the graph lacks is refused naming it."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from msmodelslim.core.config_errors import refuse_bad_numbers, validated
from msmodelslim.core.errors import ConfigError

CONVERT_APIVERSION = "modelslim_convert"


class IRKind(str, Enum):
    FLOAT = "FLOAT"
    FP8_BLOCK = "FP8_BLOCK"
    W8A8_MXFP8 = "W8A8_MXFP8"
    W4A4_MXFP4 = "W4A4_MXFP4"
    W4A8_MXFP8 = "W4A8_MXFP8"
    INT4_PACKED = "INT4_PACKED"
    NVFP4_MODELOPT = "NVFP4_MODELOPT"
    HIFP4 = "HIFP4"
    UNKNOWN = "UNKNOWN"


# The conversions, as the established tool registers them: {source: targets}.
EDGES: dict[IRKind, tuple[IRKind, ...]] = {IRKind.FP8_BLOCK: (IRKind.FLOAT,), IRKind.INT4_PACKED: (IRKind.FLOAT,),
                                           IRKind.FLOAT: (IRKind.W8A8_MXFP8,)}

ASCENDV1_SAVERS = ("ascend_v1", "ascendv1", "ascendv1_saver")
HF_SAVERS = ("huggingface", "hf", "compressed_tensors")


def shortest_route(source: IRKind, target: IRKind) -> Optional[list[IRKind]]:
    """The shortest path source -> target over EDGES (breadth first), None when there is none."""
    paths = {source: [source]}
    frontier = [source]
    while frontier:
        following = []
        for node in frontier:
            for nxt in EDGES.get(node, ()):
                if nxt not in paths:
                    paths[nxt] = paths[node] + [nxt]
                    following.append(nxt)
        frontier = following
    return paths.get(target)


def missing_edge(route: list[IRKind]) -> Optional[str]:
    """Why an explicit route cannot run (its first step that is no conversion here), None when every step is."""
    for a, b in zip(route, route[1:]):
        if b not in EDGES.get(a, ()):
            return (f"the step {a.value} -> {b.value} is no conversion of the IR graph (implemented: "
                    f"{', '.join(f'{s.value} -> {t.value}' for s, ts in EDGES.items() for t in ts)})")
    return None


class Rename(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    source: str = Field(alias="from", min_length=1)
    to: str = Field(min_length=1)

    @model_validator(mode="after")
    def _same_wildcards(self) -> "Rename":
        if self.source.count("*") != self.to.count("*"):
            raise ValueError(f"rename {self.source!r} -> {self.to!r}: both sides need the same number of '*' (each "
                             f"'*' of 'to' takes what the same '*' of 'from' matched)")
        return self


class RenameStep(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["rename"]
    patterns: list[Rename] = Field(min_length=1)


class Chunk(BaseModel):
    """Split a stacked experts tensor [E, A, B] along `dim` (1 or 2) into one part per projection, and over the
    experts: `<layer>.mlp.experts.gate_up_proj` -> `<layer>.mlp.experts.<e>.{gate,up}_proj.weight`."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["chunk"]
    dim: int = Field(1, ge=1, le=2)
    projections: list[str] = Field(default_factory=lambda: ["gate_proj", "up_proj"], min_length=1)


class Merge(BaseModel):
    """The inverse of chunk: per layer, each expert's weights named by the source patterns (their last '*' the
    expert index) concatenated along `dim` (0 or 1, of the 2-D weights), stacked over the experts:
    `<layer>.mlp.experts.<e>.{gate,up}_proj.weight` -> `<layer>.mlp.experts.gate_up_proj` [E, 2I, H]."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["merge"]
    dim: int = Field(0, ge=0, le=1)


class StructureStep(BaseModel):
    """`type: convert`: per `source` pattern (each '*' a layer or similar), the `ops` on the tensors it names; the
    outputs are named by `target` (one pattern per chunk projection: its '*'s take the source's, then the expert
    index)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["convert"]
    source: list[str] = Field(min_length=1)
    target: list[str] = Field(min_length=1)
    ops: list[Annotated[Union[Chunk, Merge], Field(discriminator="type")]] = Field(min_length=1)

    @model_validator(mode="after")
    def _targets_per_projection(self) -> "StructureStep":
        for op in self.ops:
            if isinstance(op, Chunk) and len(op.projections) != len(self.target):
                raise ValueError(f"chunk into {op.projections} needs one target pattern per projection, got "
                                 f"{len(self.target)}")
            if isinstance(op, Merge) and len(self.target) != 1:
                raise ValueError(f"merge writes one stacked tensor per layer: give one target pattern, got "
                                 f"{len(self.target)}")
        if len(self.ops) != 1:
            raise ValueError(f"{len(self.ops)} ops in one convert step: write one step per op (they run in order)")
        return self


class LinearRule(BaseModel):
    model_config = ConfigDict(extra="forbid")
    match: list[str] = Field(min_length=1)
    target: IRKind
    route: Union[Literal["auto"], list[IRKind]] = "auto"

    @model_validator(mode="after")
    def _route_reaches_target(self) -> "LinearRule":
        if self.route != "auto":
            if len(self.route) < 2 or self.route[-1] != self.target:
                raise ValueError(f"route {[r.value for r in self.route]} must list at least a source and end at the "
                                 f"target {self.target.value}")
            reason = missing_edge(self.route)
            if reason:
                raise ValueError(f"route {[r.value for r in self.route]}: {reason}")
        elif not any(shortest_route(source, self.target) for source in EDGES):
            raise ValueError(f"target {self.target.value}: no implemented conversion reaches it (targets: FLOAT, "
                             f"W8A8_MXFP8)")
        return self


class ConvertSave(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: str
    part_file_size: int = Field(4, ge=0, le=1024)

    @field_validator("type")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in ASCENDV1_SAVERS + HF_SAVERS:
            raise ValueError(f"unknown saver type {value!r} for modelslim_convert; one of "
                             f"{', '.join(ASCENDV1_SAVERS + HF_SAVERS)}")
        return value

    @property
    def ascendv1(self) -> bool:
        return self.type in ASCENDV1_SAVERS


class Parallel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    workers: int = Field(1, ge=1)
    max_group_size: Optional[int] = Field(None, ge=1)
    worker_device: str = "cpu"
    npu_max_workers: int = Field(1, ge=1)


class ConvertSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    preprocess: list[Annotated[Union[RenameStep, StructureStep], Field(discriminator="type")]] = Field(
        default_factory=list)
    linears: list[LinearRule] = Field(min_length=1)
    save: list[ConvertSave] = Field(min_length=1, max_length=1)
    parallel: Parallel = Field(default_factory=Parallel)
    defaults: dict = Field(default_factory=dict)

    @model_validator(mode="after")
    def _format_holds_target(self) -> "ConvertSpec":
        save = self.save[0]
        for i, rule in enumerate(self.linears):
            if rule.target == IRKind.W8A8_MXFP8 and not save.ascendv1:
                raise ValueError(f"linears[{i}] targets W8A8_MXFP8, which only the ascendv1 format holds; save with "
                                 f"type ascend_v1 (save.type {save.type!r} writes float Hugging Face checkpoints)")
        return self


class ConvertConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    apiversion: Literal["modelslim_convert"]
    spec: ConvertSpec


def parse_convert_config(data: Any, source: str = "<config>") -> ConvertConfig:
    """A modelslim_convert document, validated; ConfigError naming every bad field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping with 'apiversion' and 'spec'")
    refuse_bad_numbers(data, source)
    return validated(ConvertConfig, data, source)


def read_convert_config(path: Path) -> Optional[ConvertConfig]:
    """The config at `path` when it is a modelslim_convert one (validated), None for any other apiversion or a
    file that is not there (the other services report those)."""
    from msmodelslim.core.yaml_reader import read_yaml_file

    if path is None or not Path(path).is_file():
        return None
    data = read_yaml_file(Path(path), "", str(path))
    if not (isinstance(data, dict) and data.get("apiversion") == CONVERT_APIVERSION):
        return None
    return parse_convert_config(data, str(path))
