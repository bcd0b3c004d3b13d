"""The search strategies of `msmodelslim tune` (the plan YAML's `strategy`, protocol.md §7.2).

A strategy is a generator of practices: it yields a `Proposal` (a full modelslim_v1 document), receives the
`TuneResult` of that proposal through `send`, and finally returns the proposal it chooses. The tune loop
(app/tune.py) owns quantization, evaluation, caching, the iteration cap and the timeout; a strategy only decides
what to try next.

  binary_fallback                 zero fallback first; then the smallest prefix of the ranked candidates (written
                                  into the list at `rollback_path`) that meets the demand, by binary search (it
                                  assumes that keeping more layers in float never hurts). Raises SpecError when
                                  even the whole list fails.
  standing_high                   the template as is; if it fails, the smallest sensitivity level (the k most
                                  sensitive blocks in float) that passes, by binary search; then "standing high":
                                  walk the level down, trying each anti-outlier strategy in front of the
                                  quantization, remembering the last that worked and doubling the step after each
                                  success (back to 1 after a failure, cut at level 0; a failure at step 1
                                  ends the walk).
  standing_high_with_experience   standing_high built from the bundled expert rules (`EXPERT_RULES`): structure
                                  types -> schemes, and the anti-outlier strategies of the quant_type.

Candidates come from `msmodelslim analyze` under the template's own scheme (app/analyze.py) unless given.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from enum import Enum
from typing import Annotated, Any, Callable, Generator, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from msmodelslim.app.tune_judge import TuneResult
from msmodelslim.core.config import parse_config
from msmodelslim.core.errors import ConfigError, SpecError, UnsupportedError
from msmodelslim.core.logging import get_logger

log = get_logger("app.tune")


@dataclass
class Proposal:
    """One practice to try. `fallback`: the layer patterns it keeps in float beyond the template's own."""

    practice: dict
    fallback: list[str] = field(default_factory=list)
    note: str = ""


ProposalStream = Generator[Proposal, TuneResult, Optional[Proposal]]
# A candidate is one exclude pattern, or several that must fall back together (a fused q/k/v or gate/up group:
# the engine needs one type for all its members).
Candidate = Union[str, list[str]]
# (template document, analysis data set or None, analysis metric) -> candidates, most sensitive first
RankCandidates = Callable[[dict, Optional[str], str], list[Candidate]]
ANALYSIS_METRICS = ("mse_layer_wise", "mse_model_wise", "kurtosis", "std", "quantile")


def patterns_of(candidates: list[Candidate]) -> list[str]:
    """The exclude patterns of the first candidates, in order, without repeats."""
    out: list[str] = []
    for candidate in candidates:
        for pattern in [candidate] if isinstance(candidate, str) else candidate:
            if pattern not in out:
                out.append(pattern)
    return out


def check_template(template: dict, where: str) -> dict:
    """A full modelslim_v1 document (metadata optional), validated now; returned as a plain dict."""
    if not isinstance(template, dict) or template.get("apiversion") != "modelslim_v1":
        raise ConfigError(f"{where}: must be a full practice with apiversion modelslim_v1 (and spec)")
    parse_config(copy.deepcopy(template), where)
    return copy.deepcopy(template)


# ---- rollback_path ------------------------------------------------------------------------------------------------
def rollback_list(document: dict, path: str) -> list:
    """The list at dotted `path` (e.g. spec.process.1.exclude) inside `document`; a missing last key of a mapping
    becomes an empty list there. ConfigError, naming the failing part, for anything else."""
    parts = path.split(".")
    node: Any = document
    for depth, part in enumerate(parts):
        here = ".".join(parts[: depth + 1])
        last = depth == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"strategy.rollback_path {path}: {here} is not an index of a list of {len(node)}")
            if last:
                raise ConfigError(f"strategy.rollback_path {path} must end at a list field (e.g. ...exclude)")
            node = node[int(part)]
        elif isinstance(node, dict):
            if part not in node:
                if not last:
                    raise ConfigError(f"strategy.rollback_path {path}: {here} does not exist in the template")
                node[part] = []
            node = node[part] if not last else node.setdefault(part, [])
        else:
            raise ConfigError(f"strategy.rollback_path {path}: {here} goes into a {type(node).__name__}")
    if not isinstance(node, list):
        raise ConfigError(f"strategy.rollback_path {path} points at a {type(node).__name__}, not a list")
    return node


def with_fallback(template: dict, path: str, patterns: list[str]) -> dict:
    practice = copy.deepcopy(template)
    target = rollback_list(practice, path)
    target.extend(p for p in patterns if p not in target)
    return practice


def linear_quant_steps(configs: list) -> list[dict]:
    """Every linear_quant step of a spec.process list, inside groups too."""
    found = []
    for step in configs:
        if step.get("type") == "group":
            found += linear_quant_steps(step.get("configs", []))
        elif step.get("type") == "linear_quant":
            found.append(step)
    return found


def excluding(template: dict, patterns: list[str], anti_outlier: Optional[list[dict]] = None) -> dict:
    """The template with `patterns` added to the exclude of every linear_quant step, and the anti-outlier steps
    (if any) in front of its processing."""
    practice = copy.deepcopy(template)
    for step in linear_quant_steps(practice["spec"]["process"]):
        step["exclude"] = list(step.get("exclude", [])) + [p for p in patterns if p not in step.get("exclude", [])]
    if anti_outlier:
        practice["spec"]["process"] = copy.deepcopy(anti_outlier) + practice["spec"]["process"]
    return practice


SearchStream = Generator[Proposal, TuneResult, tuple[int, Optional[Proposal]]]


def _smallest_passing(make: Callable[[int], Proposal], lo: int, hi: int) -> SearchStream:
    """Binary search for the smallest k in [lo, hi] whose proposal passes, trusting that larger k pass more
    often. Returns (k, its passing proposal), or (hi, None) when k = hi was tried and failed."""
    passing: Optional[Proposal] = None
    while lo < hi:
        mid = (lo + hi) // 2
        proposal = make(mid)
        if (yield proposal).passed:
            hi, passing = mid, proposal
        else:
            lo = mid + 1
    if passing is None:  # k = hi was never tried
        proposal = make(hi)
        if (yield proposal).passed:
            passing = proposal
    return hi, passing


# ---- binary_fallback ----------------------------------------------------------------------------------------------
class BinaryFallbackConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["binary_fallback"]
    template: dict[str, Any]
    rollback_path: str = Field(min_length=1)
    rollback_candidates: list[Union[str, list[str]]] = Field(default_factory=list)
    analysis_dataset: Optional[str] = None  # default: the template's data set
    analysis_metric: str = "mse_layer_wise"  # ours: how `analyze` ranks the candidates (layer or linear scope)

    @field_validator("analysis_metric")
    @classmethod
    def _metric(cls, value: str) -> str:
        if value not in ANALYSIS_METRICS:
            raise ValueError(f"must be one of {', '.join(ANALYSIS_METRICS)}")
        return value


class BinaryFallback:
    def __init__(self, config: BinaryFallbackConfig):
        self.config = config
        self.template = check_template(config.template, "strategy.template")
        rollback_list(copy.deepcopy(self.template), config.rollback_path)  # a bad path fails now

    def proposals(self, rank: RankCandidates) -> ProposalStream:
        config = self.config

        def make(count: int) -> Proposal:
            chosen = patterns_of(candidates[:count])
            return Proposal(with_fallback(self.template, config.rollback_path, chosen), chosen,
                            f"binary_fallback: {count} of {len(candidates)} candidates in float")

        zero = Proposal(with_fallback(self.template, config.rollback_path, []), [], "binary_fallback: no fallback")
        if (yield zero).passed:
            return zero
        candidates = list(config.rollback_candidates) or rank(self.template, config.analysis_dataset,
                                                              config.analysis_metric)
        if not candidates:
            raise SpecError("binary_fallback: the template fails the demand and there are no fallback candidates")
        _, passing = yield from _smallest_passing(make, 1, len(candidates))
        if passing is None:
            raise SpecError(f"binary_fallback: even with all {len(candidates)} candidates in float "
                            f"({config.rollback_path}) the demand is not met; relax the demand or change the template")
        return passing


# ---- standing_high ------------------------------------------------------------------------------------------------
W8 = {"dtype": "int8", "scope": "per_channel", "symmetric": True, "method": "minmax"}
STATIC_A8 = {"dtype": "int8", "scope": "per_tensor", "symmetric": False, "method": "minmax"}
DYNAMIC_A8 = {"dtype": "int8", "scope": "per_token", "symmetric": True, "method": "minmax"}
W4_SSZ = {"dtype": "int4", "scope": "per_channel", "symmetric": True, "method": "ssz", "ext": {"step": 10}}


def default_standing_high_template() -> dict:
    """The established default: W8A8 static on every linear, ascendv1_saver (4 GB shards), mix_calib.jsonl."""
    return {"apiversion": "modelslim_v1",
            "metadata": {"config_id": "standing_high", "label": {"w_bit": 8, "a_bit": 8}},
            "spec": {"process": [{"type": "linear_quant", "qconfig": {"act": STATIC_A8, "weight": W8},
                                  "include": ["*"]}],
                     "save": [{"type": "ascendv1_saver", "part_file_size": 4}],
                     "dataset": "mix_calib.jsonl"}}


class StandingHighConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["standing_high"]
    anti_outlier_strategies: list[list[dict[str, Any]]] = Field(min_length=1)
    template: dict[str, Any] = Field(default_factory=default_standing_high_template)
    metadata: Optional[dict[str, Any]] = None
    analysis_dataset: Optional[str] = None
    analysis_metric: str = "mse_layer_wise"

    @model_validator(mode="after")
    def _check(self) -> "StandingHighConfig":
        if any(not steps for steps in self.anti_outlier_strategies):
            raise ValueError("anti_outlier_strategies: each strategy is a non-empty list of processor configs")
        if self.analysis_metric not in ANALYSIS_METRICS:
            raise ValueError(f"analysis_metric must be one of {', '.join(ANALYSIS_METRICS)}")
        return self


class StandingHigh:
    def __init__(self, config: StandingHighConfig):
        self.config = config
        template = copy.deepcopy(config.template)
        if config.metadata is not None:
            template["metadata"] = copy.deepcopy(config.metadata)
        template.setdefault("metadata", {}).setdefault("config_id", "standing_high")
        self.template = check_template(template, "strategy.template")
        if not linear_quant_steps(self.template["spec"]["process"]):
            raise ConfigError("strategy.template must contain at least one linear_quant step (the fallback layers "
                              "go into its exclude)")
        for i, steps in enumerate(config.anti_outlier_strategies):  # each combination is valid now, not at try 7
            check_template(excluding(self.template, [], steps), f"strategy.anti_outlier_strategies[{i}]")

    def proposals(self, rank: RankCandidates) -> ProposalStream:
        config, strategies = self.config, self.config.anti_outlier_strategies
        plain = Proposal(copy.deepcopy(self.template), [], "standing_high: template")
        if (yield plain).passed:
            return plain
        levels = rank(self.template, config.analysis_dataset, config.analysis_metric)
        if not levels:
            return None

        def make(level: int, strategy: Optional[int] = None) -> Proposal:
            steps = strategies[strategy] if strategy is not None else None
            name = f"anti-outlier strategy {strategy}" if strategy is not None else "no anti-outlier"
            chosen = patterns_of(levels[:level])
            return Proposal(excluding(self.template, chosen, steps), chosen,
                            f"standing_high: level {level} of {len(levels)}, {name}")

        level, best = yield from _smallest_passing(make, 1, len(levels))
        if best is None:
            log.warning("standing_high: even level %d (every ranked block in float) fails the demand; "
                        "returning the best found", len(levels))
            return None
        last_worked: Optional[int] = None
        step = 1
        while level > 0:
            target = level - min(step, level)  # a step past level 0 is cut to 0
            order = ([last_worked] if last_worked is not None else []) + [
                i for i in range(len(strategies)) if i != last_worked]
            success = None
            for index in order:
                proposal = make(target, index)
                if (yield proposal).passed:
                    success = proposal
                    last_worked = index
                    break
            if success is not None:
                best, level, step = success, target, step * 2
            elif step > 1:
                step = 1
            else:
                break
        return best


# ---- standing_high_with_experience --------------------------------------------------------------------------------
class StructureType(str, Enum):
    GQA = "GQA"
    MHA = "MHA"
    MLA = "MLA"
    FFN = "FFN"
    MoE = "MoE"
    DSA = "DSA"
    SWA = "SWA"
    GatedDeltaNet = "GatedDeltaNet"


ATTENTION = {StructureType.GQA, StructureType.MHA, StructureType.MLA}
KEPT_FLOAT = {StructureType.DSA, StructureType.SWA, StructureType.GatedDeltaNet}
# The bundled expert experience (the established tool's expert_experience.yaml, in our words):
# per quant_type, the anti-outlier strategies to try and the scheme of each structure type (None: stays float).
EXPERT_RULES: dict[str, dict] = {
    "w8a8": {
        "anti_outlier": [[{"type": "flex_smooth_quant"}], [{"type": "iter_smooth"}]],
        "schemes": {**{t: {"act": STATIC_A8, "weight": W8} for t in ATTENTION},
                    StructureType.FFN: {"act": DYNAMIC_A8, "weight": W8},
                    StructureType.MoE: {"act": DYNAMIC_A8, "weight": W8},
                    **{t: None for t in KEPT_FLOAT}},
        "label": {"w_bit": 8, "a_bit": 8},
    },
    "w4a8": {
        "anti_outlier": [[{"type": "flex_awq_ssz", "qconfig": {"act": DYNAMIC_A8, "weight": W4_SSZ}}]],
        "schemes": {**{t: {"act": STATIC_A8, "weight": W8} for t in ATTENTION},
                    StructureType.MoE: {"act": DYNAMIC_A8, "weight": W4_SSZ},
                    **{t: None for t in KEPT_FLOAT}},
        "label": {"w_bit": 4, "a_bit": 8},
    },
}


class StructureConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: StructureType
    include: list[str] = Field(min_length=1)
    exclude: list[str] = Field(default_factory=list)


class StandingHighWithExperienceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["standing_high_with_experience"]
    structure_configs: list[StructureConfig] = Field(min_length=1)
    quant_type: Literal["w8a8", "w4a8"] = "w8a8"
    dataset: str = "mix_calib.jsonl"  # ours: the calibration set of the built template
    analysis_metric: str = "mse_layer_wise"


def experience_template(config: StandingHighWithExperienceConfig) -> StandingHighConfig:
    """The standing_high config the expert rules give for these structures; a structure type the rules do not
    cover for this quant_type is refused by name."""
    rules = EXPERT_RULES[config.quant_type]
    steps = []
    for i, structure in enumerate(config.structure_configs):
        if structure.type not in rules["schemes"]:
            covered = ", ".join(sorted(t.value for t in rules["schemes"]))
            raise UnsupportedError(f"strategy.structure_configs[{i}]: the bundled expert rules have no "
                                   f"{config.quant_type} scheme for {structure.type.value} (they cover {covered}); "
                                   f"use strategy standing_high with your own template for it")
        qconfig = rules["schemes"][structure.type]
        if qconfig is None:
            log.info("standing_high_with_experience: %s (%s) stays in float by the expert rules",
                     structure.type.value, ", ".join(structure.include))
            continue
        steps.append({"type": "linear_quant", "qconfig": copy.deepcopy(qconfig), "include": list(structure.include),
                      "exclude": list(structure.exclude)})
    if not steps:
        raise ConfigError("strategy.structure_configs: every structure stays in float under the expert rules; "
                          "nothing to quantize")
    process = steps if len(steps) == 1 else [{"type": "group", "configs": steps}]
    template = {"apiversion": "modelslim_v1",
                "metadata": {"config_id": "standing_high_with_experience", "label": dict(rules["label"])},
                "spec": {"process": process, "save": [{"type": "ascendv1_saver", "part_file_size": 4}],
                         "dataset": config.dataset}}
    return StandingHighConfig(type="standing_high", anti_outlier_strategies=copy.deepcopy(rules["anti_outlier"]),
                              template=template, analysis_metric=config.analysis_metric)


StrategyConfig = Annotated[Union[BinaryFallbackConfig, StandingHighConfig, StandingHighWithExperienceConfig],
                           Field(discriminator="type")]


def build_strategy(config) -> Union[BinaryFallback, StandingHigh]:
    if isinstance(config, BinaryFallbackConfig):
        return BinaryFallback(config)
    if isinstance(config, StandingHighWithExperienceConfig):
        return StandingHigh(experience_template(config))
    return StandingHigh(config)
