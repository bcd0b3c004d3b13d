"""Quantization settings (`qconfig`) and the deployable schemes they combine into.

A `QConfig` says how one tensor is quantized; a `LinearQConfig` pairs the activation and weight settings of a
linear layer. Only pairs that a serving kernel implements are accepted (`Scheme`), so a config that validates
also saves.
"""
from __future__ import annotations

import enum
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from msmodelslim.core.logging import get_logger
from msmodelslim.core.roadmap import not_yet

log = get_logger("quantizer.scheme")


class QDType(str, enum.Enum):
    float = "float"
    int8 = "int8"
    int4 = "int4"

    @property
    def bits(self) -> int:
        return {"float": 16, "int8": 8, "int4": 4}[self.value]


class QScope(str, enum.Enum):
    per_tensor = "per_tensor"
    per_token = "per_token"
    per_channel = "per_channel"
    per_group = "per_group"
    pd_mix = "pd_mix"  # PD-mix: one static range for decode nodes, per-token dynamic on prefill nodes

    @property
    def static(self) -> bool:
        """Whether activation ranges come from calibration (per_tensor, and pd_mix's decode half)."""
        return self in (QScope.per_tensor, QScope.pd_mix)


IMPLEMENTED_METHODS = ("minmax", "none", "histogram", "ssz", "gptq", "lowbit_sparse")
WEIGHT_METHODS = ("minmax", "ssz", "gptq", "lowbit_sparse")
ACT_METHODS = ("minmax", "histogram", "none")
# ext keys each method accepts, with their defaults (group_size belongs to scope per_group).
METHOD_EXT = {
    "ssz": {"step": 50},
    "gptq": {"percdamp": 0.01, "block_size": 128, "act_order": False},
    # W8A8S (quantizer/lowbit_sparse.py): the bulk on a w_bit grid, outliers (fraction, or sigma) kept in int8
    "lowbit_sparse": {"w_bit": 4, "fraction": 0.01, "use_sigma": False, "sigma_factor": 3.0, "nonuniform": False},
}


def _check_positive_ext(method: str, ext: dict) -> None:
    """The usual ext options: booleans, or positive numbers of the default's type."""
    for key, default in METHOD_EXT.get(method, {}).items():
        value = ext.get(key, default)
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ValueError(f"ext.{key} must be true or false")
        elif isinstance(value, bool) or not isinstance(value, type(default)) or value <= 0:
            raise ValueError(f"ext.{key} must be a positive {type(default).__name__} (default {default})")


def _number(value, name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"ext.{name} must be a number from {low} to {high}, got {value!r}")
    return float(value)


def _check_lowbit_sparse_ext(method: str, ext: dict) -> None:
    """lowbit_sparse's own ranges: fraction may be 0, sigma_factor an integer (upstream writes 3), w_bit 2..7."""
    options = {**METHOD_EXT[method], **ext}
    w_bit = options["w_bit"]
    if isinstance(w_bit, bool) or not isinstance(w_bit, int) or not 2 <= w_bit <= 7:
        raise ValueError(f"ext.w_bit (bits of the bulk grid inside int8) must be an integer from 2 to 7, got {w_bit!r}")
    _number(options["fraction"], "fraction", 0.0, 0.5)
    sigma = _number(options["sigma_factor"], "sigma_factor", 0.0, 100.0)
    if sigma == 0:
        raise ValueError("ext.sigma_factor must be positive")
    for flag in ("use_sigma", "nonuniform"):
        if not isinstance(options[flag], bool):
            raise ValueError(f"ext.{flag} must be true or false")
    if options["nonuniform"]:
        raise ValueError("ext.nonuniform: true (the established tool's non-uniform 'power' grid for sparse "
                         "quantization) is not implemented yet; use nonuniform: false, the uniform int grid")


EXT_CHECKS = {"lowbit_sparse": _check_lowbit_sparse_ext}  # methods whose ext the positive-number rule does not fit


class QConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dtype: QDType = QDType.int8
    scope: QScope = QScope.per_tensor
    symmetric: bool = True
    method: str = "minmax"
    ext: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> "QConfig":
        if self.method == "autoround":
            raise ValueError("method 'autoround' is tuned by the autoround_quant processor: put this qconfig in an "
                             "autoround_quant strategy (type: autoround_quant, strategies: [{qconfig: ...}])")
        planned = not_yet("method", self.method)
        if planned:
            raise ValueError(f"{planned}; available: {', '.join(IMPLEMENTED_METHODS)}")
        if self.method not in IMPLEMENTED_METHODS:
            raise ValueError(f"method {self.method!r} is not one of {', '.join(IMPLEMENTED_METHODS)}")
        if self.dtype == QDType.float:
            if self.method != "none":
                # The protocol's float default is {dtype: float, method: none}; accept minmax as a harmless typo? No:
                # a float tensor has nothing to observe, so say so.
                raise ValueError("dtype float (not quantized) takes method 'none'")
        elif self.method == "none":
            raise ValueError(f"dtype {self.dtype.value} needs a method ({', '.join(WEIGHT_METHODS + ACT_METHODS[1:2])})")
        known = {"group_size", *METHOD_EXT.get(self.method, {})}
        unknown = set(self.ext) - known
        if unknown:  # upstream ignores ext keys its method does not read; so do we, but say so
            log.warning("qconfig ext key(s) %s are not used by method %s (known: %s) and are ignored",
                        sorted(unknown), self.method, ", ".join(sorted(known)))
        EXT_CHECKS.get(self.method, _check_positive_ext)(self.method, self.ext)
        if self.scope == QScope.per_group:
            size = self.ext.get("group_size")
            if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
                raise ValueError("scope per_group needs ext.group_size, a positive integer (e.g. ext: {group_size: 64})")
        elif "group_size" in self.ext:
            raise ValueError(f"ext.group_size only applies to scope per_group, not {self.scope.value}")
        return self

    @property
    def group_size(self) -> Optional[int]:
        return self.ext.get("group_size") if self.scope == QScope.per_group else None

    def option(self, key: str):
        """A method's ext option, or its default."""
        return self.ext.get(key, METHOD_EXT[self.method][key])

    @property
    def is_float(self) -> bool:
        return self.dtype == QDType.float


def _float_act() -> QConfig:
    return QConfig(dtype=QDType.float, scope=QScope.per_tensor, symmetric=True, method="none")


class Scheme(str, enum.Enum):
    """Deployable (activation, weight) pairs, named by their ascendv1 type tag."""

    W8A8 = "W8A8"  # static per-tensor int8 activations, per-channel symmetric int8 weights
    W8A8_DYNAMIC = "W8A8_DYNAMIC"  # per-token int8 activations computed at run time
    W8A16 = "W8A16"  # int8 weights only
    W4A16 = "W4A16"  # int4 weights only
    W4A8_DYNAMIC = "W4A8_DYNAMIC"  # int4 weights, per-token int8 activations
    W8A8_MIX = "W8A8_MIX"  # PD-mix: W8A8 static on decode nodes, W8A8 dynamic on the others (formats.md A.4.2)
    W8A8S = "W8A8S"  # W8A8 static whose int8 weights are low-bit sparse (method lowbit_sparse; formats.md A.4.11)


SUPPORTED_PAIRS = """supported (act -> weight) pairs:
  float                         -> int8 per_channel|per_group (W8A16)
  float                         -> int4 per_channel|per_group, symmetric (W4A16)
  int8 per_tensor minmax        -> int8 per_channel symmetric (W8A8 static)
  int8 per_token symmetric      -> int8 per_channel|per_group symmetric (W8A8_DYNAMIC)
  int8 per_token symmetric      -> int4 per_channel symmetric (W4A8_DYNAMIC)
  int8 pd_mix minmax            -> int8 per_channel symmetric (W8A8_MIX: static on decode, dynamic on prefill)
  int8 per_tensor minmax        -> int8 per_channel symmetric, method lowbit_sparse (W8A8S)"""


def resolve_scheme(act: QConfig, weight: QConfig) -> Scheme:
    """The scheme an (act, weight) pair deploys as; ValueError naming the supported pairs otherwise."""
    w, a = weight, act
    if w.is_float:
        raise ValueError("weight dtype float quantizes nothing; exclude the layer instead")
    if w.method == "lowbit_sparse":
        if (a.dtype, a.scope, w.dtype, w.scope, w.symmetric) == (QDType.int8, QScope.per_tensor, QDType.int8,
                                                                  QScope.per_channel, True):
            return Scheme.W8A8S
        raise ValueError("weight method lowbit_sparse writes W8A8S, the static W8A8 tensor set: it needs act "
                         "{dtype: int8, scope: per_tensor} and weight {dtype: int8, scope: per_channel, "
                         "symmetric: true} (ext.w_bit sets the bulk's bits inside int8)")
    if w.scope not in (QScope.per_channel, QScope.per_group):
        raise ValueError(f"weight scope {w.scope.value} is not supported; use per_channel or per_group")
    if a.is_float:
        if w.dtype == QDType.int8:
            return Scheme.W8A16
        if w.symmetric:
            return Scheme.W4A16
    elif a.dtype == QDType.int8 and a.scope == QScope.per_tensor:
        if w.dtype == QDType.int8 and w.scope == QScope.per_channel and w.symmetric:
            return Scheme.W8A8
    elif a.dtype == QDType.int8 and a.scope == QScope.pd_mix:
        if w.dtype == QDType.int8 and w.scope == QScope.per_channel and w.symmetric:
            return Scheme.W8A8_MIX
    elif a.dtype == QDType.int8 and a.scope == QScope.per_token and a.symmetric:
        if w.dtype == QDType.int8 and w.symmetric:
            return Scheme.W8A8_DYNAMIC
        if w.dtype == QDType.int4 and w.symmetric and w.scope == QScope.per_channel:
            return Scheme.W4A8_DYNAMIC
    describe = lambda q: "float" if q.is_float else f"{q.dtype.value} {q.scope.value} {'sym' if q.symmetric else 'asym'}"
    raise ValueError(f"act {describe(a)} with weight {describe(w)} has no deployable kernel; {SUPPORTED_PAIRS}")


class LinearQConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    act: QConfig = Field(default_factory=_float_act)
    weight: QConfig

    @model_validator(mode="after")
    def _check_pair(self) -> "LinearQConfig":
        if not self.weight.is_float and self.weight.method not in WEIGHT_METHODS:
            raise ValueError(f"weight method {self.weight.method!r} is for activations; weights take "
                             f"{', '.join(WEIGHT_METHODS)}")
        if self.act.method not in ACT_METHODS:
            raise ValueError(f"act method {self.act.method!r} is for weights; activations take minmax or histogram")
        if self.act.method == "histogram" and not (self.act.dtype == QDType.int8 and self.act.scope == QScope.per_tensor):
            raise ValueError("act method histogram calibrates static int8 per_tensor activations only")
        resolve_scheme(self.act, self.weight)
        return self

    @property
    def scheme(self) -> Scheme:
        return resolve_scheme(self.act, self.weight)

    @property
    def static_act(self) -> bool:
        return not self.act.is_float and self.act.scope.static

    @property
    def needs_calibration(self) -> bool:
        """Static activation ranges and GPTQ's Hessian come from data; the other methods do not."""
        return self.static_act or self.weight.method == "gptq"
