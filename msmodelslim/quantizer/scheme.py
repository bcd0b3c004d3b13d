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
from msmodelslim.quantizer.methods import (ACT_METHODS, EXT_CHECKS, IMPLEMENTED_METHODS, METHOD_EXT, MX_WEIGHT_METHODS,
                                          WEIGHT_METHODS, check_positive_ext)

log = get_logger("quantizer.scheme")


class QDType(str, enum.Enum):
    float = "float"
    int8 = "int8"
    int4 = "int4"
    fp8_e4m3 = "fp8_e4m3"  # E4M3 elements with a float32 scale (per channel / per token)
    mxfp8 = "mxfp8"  # E4M3 elements, one E8M0 scale per block of 32 along the reduction axis
    mxfp4 = "mxfp4"  # E2M1 elements, one E8M0 scale per block of 32
    # E2M1 elements, an FP8 E4M3 scale per block of 16 and a float32 global scale (quantizer/nvfp4.py); a
    # protocol extension, written only by the compressed_tensors saver
    nvfp4 = "nvfp4"

    @property
    def bits(self) -> int:
        return {"float": 16, "int8": 8, "int4": 4, "fp8_e4m3": 8, "mxfp8": 8, "mxfp4": 4, "nvfp4": 4}[self.value]

    @property
    def element(self) -> Optional[str]:
        """The floating-point element format (quantizer/float_formats.py) of a float dtype, None for int ones."""
        return {"fp8_e4m3": "fp8_e4m3", "mxfp8": "fp8_e4m3", "mxfp4": "fp4_e2m1", "nvfp4": "fp4_e2m1"}.get(self.value)

    @property
    def is_mx(self) -> bool:
        return self in (QDType.mxfp8, QDType.mxfp4)


class QScope(str, enum.Enum):
    per_tensor = "per_tensor"
    per_token = "per_token"
    per_channel = "per_channel"
    per_group = "per_group"
    pd_mix = "pd_mix"  # PD-mix: one static range for decode nodes, per-token dynamic on prefill nodes
    per_block = "per_block"  # MX: one shared scale per 32 consecutive elements along the reduction axis
    dual_scale = "dual_scale"  # MXFP4 under a float32 scale per dual_block_size elements (quantizer/dualscale.py)

    @property
    def static(self) -> bool:
        """Whether activation ranges come from calibration (per_tensor, and pd_mix's decode half)."""
        return self in (QScope.per_tensor, QScope.pd_mix)


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
        if self.dtype.element is not None:
            self._check_float_format()
        elif self.scope == QScope.dual_scale or self.method == "dualscale":
            raise ValueError("scope dual_scale and method dualscale go together, with dtype mxfp4 "
                             f"(W4A4_MXFP4_DUALSCALE), not {self.dtype.value}")
        elif self.method in MX_WEIGHT_METHODS:
            raise ValueError(f"method {self.method!r} chooses MX shared exponents: it takes dtype "
                             f"{MX_WEIGHT_METHODS[self.method]} (scope per_block), not {self.dtype.value}")
        known = {"group_size", *METHOD_EXT.get(self.method, {})}
        unknown = set(self.ext) - known
        if unknown:  # upstream ignores ext keys its method does not read; so do we, but say so
            log.warning("qconfig ext key(s) %s are not used by method %s (known: %s) and are ignored",
                        sorted(unknown), self.method, ", ".join(sorted(known)))
        EXT_CHECKS.get(self.method, check_positive_ext)(self.method, self.ext)
        if self.scope == QScope.per_group:
            size = self.ext.get("group_size")
            if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
                raise ValueError("scope per_group needs ext.group_size, a positive integer (e.g. ext: {group_size: 64})")
        elif "group_size" in self.ext:
            raise ValueError(f"ext.group_size only applies to scope per_group, not {self.scope.value}")
        return self

    def _check_float_format(self) -> None:
        """fp8_e4m3 / mxfp8 / mxfp4: symmetric by construction, on their own scopes, rounded by minmax."""
        name = self.dtype.value
        if (self.scope == QScope.dual_scale) != (self.method == "dualscale") or (
                self.scope == QScope.dual_scale and self.dtype != QDType.mxfp4):
            raise ValueError(f"scope dual_scale and method dualscale go together, with dtype mxfp4 (W4A4_MXFP4_DUALSCALE); "
                             f"got dtype {name}, scope {self.scope.value}, method {self.method}")
        if self.scope == QScope.dual_scale:
            if not self.symmetric:
                raise ValueError("dtype mxfp4 is symmetric (a float grid has no zero point); set symmetric: true")
            return
        if self.dtype == QDType.nvfp4 and self.scope != QScope.per_block:
            raise ValueError(f"dtype nvfp4 takes scope per_block (one FP8 scale per 16 elements along the reduction "
                             f"axis, under a per-tensor global scale), not {self.scope.value}")
        if self.dtype.is_mx and self.scope != QScope.per_block:
            raise ValueError(f"dtype {name} takes scope per_block (one E8M0 scale per 32 elements along the "
                             f"reduction axis), not {self.scope.value}")
        if self.dtype == QDType.fp8_e4m3 and self.scope not in (QScope.per_channel, QScope.per_token, QScope.per_tensor):
            raise ValueError(f"dtype fp8_e4m3 takes scope per_channel (weights) or per_token (activations), "
                             f"not {self.scope.value}")
        if not self.symmetric:
            raise ValueError(f"dtype {name} is symmetric (a float grid has no zero point); set symmetric: true")
        if self.method == "gptq" and self.ext.get("clip_search"):
            raise ValueError(f"ext.clip_search shrinks integer ranges; dtype {name} takes its scales from its own "
                             f"rule (drop clip_search)")
        allowed = ["minmax", *(m for m, d in MX_WEIGHT_METHODS.items() if d == name), "gptq"]
        if self.method not in allowed:
            raise ValueError(f"method {self.method!r} does not apply to dtype {name}, which takes method "
                             f"{' or '.join(allowed)}")

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
    W4A4_DYNAMIC = "W4A4_DYNAMIC"  # int4 weights per channel, per-token int4 activations (formats.md A.4.7)
    W8A8_MIX = "W8A8_MIX"  # PD-mix: W8A8 static on decode nodes, W8A8 dynamic on the others (formats.md A.4.2)
    W8A8S = "W8A8S"  # W8A8 static whose int8 weights are low-bit sparse (method lowbit_sparse; formats.md A.4.11)
    # Floating-point schemes (formats.md A.4.9, A.4.10); activations are always quantized at run time.
    # per-channel FP8 weights, per-token FP8 activations; the engine's tag (the established writer spells it
    # WFP8AFP8_DYNAMIC, which vLLM-Ascend rejects: formats.md A.4.9; read as an alias)
    W8A8FP8_DYNAMIC = "W8A8FP8_DYNAMIC"
    W8A8_MXFP8 = "W8A8_MXFP8"  # MXFP8 weights and activations
    W4A8_MXFP = "W4A8_MXFP"  # MXFP4 weights, MXFP8 activations
    W4A4_MXFP4 = "W4A4_MXFP4"  # MXFP4 weights and activations
    W4A16_MXFP4 = "W4A16_MXFP4"  # MXFP4 weights only
    # MXFP4 weights and activations, each under a float32 scale per dual_block_size inputs (quantizer/dualscale.py)
    W4A4_MXFP4_DUALSCALE = "W4A4_MXFP4_DUALSCALE"
    # NVFP4 weights only (quantizer/nvfp4.py): compressed-tensors' nvfp4-pack-quantized (vLLM's W4A16Fp4); not an
    # ascendv1 type (that writer refuses it before any weight is read)
    W4A16_NVFP4 = "W4A16_NVFP4"
    # NVFP4 weights and activations (vLLM's W4A4Fp4): a global input scale from calibration, FP8 scales per 16
    # inputs computed at run time
    W4A4_NVFP4 = "W4A4_NVFP4"

    @property
    def is_float_format(self) -> bool:
        return self in FLOAT_FORMAT_SCHEMES


FLOAT_FORMAT_SCHEMES = frozenset({Scheme.W8A8FP8_DYNAMIC, Scheme.W8A8_MXFP8, Scheme.W4A8_MXFP, Scheme.W4A4_MXFP4,
                                  Scheme.W4A16_MXFP4, Scheme.W4A4_MXFP4_DUALSCALE, Scheme.W4A16_NVFP4,
                                  Scheme.W4A4_NVFP4})
# (act dtype or None for float, weight dtype) -> scheme, for the floating-point formats
FLOAT_FORMAT_PAIRS = {
    (QDType.fp8_e4m3, QDType.fp8_e4m3): Scheme.W8A8FP8_DYNAMIC,
    (QDType.mxfp8, QDType.mxfp8): Scheme.W8A8_MXFP8,
    (QDType.mxfp8, QDType.mxfp4): Scheme.W4A8_MXFP,
    (QDType.mxfp4, QDType.mxfp4): Scheme.W4A4_MXFP4,
    (None, QDType.mxfp4): Scheme.W4A16_MXFP4,
    (None, QDType.nvfp4): Scheme.W4A16_NVFP4,
    (QDType.nvfp4, QDType.nvfp4): Scheme.W4A4_NVFP4,
}


SUPPORTED_PAIRS = """supported (act -> weight) pairs:
  float                         -> int8 per_channel|per_group (W8A16)
  float                         -> int4 per_channel|per_group, symmetric (W4A16)
  int8 per_tensor minmax        -> int8 per_channel symmetric (W8A8 static)
  int8 per_token symmetric      -> int8 per_channel|per_group symmetric (W8A8_DYNAMIC)
  int8 per_token symmetric      -> int4 per_channel symmetric (W4A8_DYNAMIC)
  int4 per_token symmetric      -> int4 per_channel symmetric (W4A4_DYNAMIC; low-bit activations want quarot first)
  int8 pd_mix minmax            -> int8 per_channel symmetric (W8A8_MIX: static on decode, dynamic on prefill)
  int8 per_tensor minmax        -> int8 per_channel symmetric, method lowbit_sparse (W8A8S)
  fp8_e4m3 per_token            -> fp8_e4m3 per_channel (W8A8FP8_DYNAMIC)
  mxfp8 per_block               -> mxfp8 per_block (W8A8_MXFP8)
  mxfp8 per_block               -> mxfp4 per_block (W4A8_MXFP)
  mxfp4 per_block               -> mxfp4 per_block (W4A4_MXFP4)
  float                         -> mxfp4 per_block (W4A16_MXFP4)
  mxfp4 dual_scale dualscale    -> mxfp4 dual_scale dualscale, same dual_block_size (W4A4_MXFP4_DUALSCALE)
  float                         -> nvfp4 per_block (W4A16_NVFP4; compressed_tensors only)
  nvfp4 per_block minmax        -> nvfp4 per_block (W4A4_NVFP4; compressed_tensors only)"""


def _float_format_scheme(act: QConfig, weight: QConfig) -> Scheme:
    """The floating-point pairs of SUPPORTED_PAIRS (both qconfigs already checked on their own)."""
    if QScope.dual_scale in (act.scope, weight.scope):
        if act.scope != weight.scope:
            raise ValueError("W4A4_MXFP4_DUALSCALE needs act and weight both {dtype: mxfp4, scope: dual_scale, "
                             "method: dualscale} (the established IR pairs them only with each other)")
        if act.ext["dual_block_size"] != weight.ext["dual_block_size"]:
            raise ValueError(f"act and weight dual_block_size differ ({act.ext['dual_block_size']} and "
                             f"{weight.ext['dual_block_size']}): the checkpoint stores only the weight's blocks, "
                             f"which the kernel also uses for the activations; make them equal")
        return Scheme.W4A4_MXFP4_DUALSCALE
    scheme = FLOAT_FORMAT_PAIRS.get((None if act.is_float else act.dtype, weight.dtype))
    act_scope_ok = act.is_float or act.scope == (QScope.per_block if act.dtype.is_mx or act.dtype == QDType.nvfp4
                                                 else QScope.per_token)
    weight_scope_ok = weight.scope == (QScope.per_block if weight.dtype.is_mx or weight.dtype == QDType.nvfp4
                                       else QScope.per_channel)
    if scheme is None or not act_scope_ok or not weight_scope_ok:
        describe = lambda q: "float" if q.is_float else f"{q.dtype.value} {q.scope.value}"
        raise ValueError(f"act {describe(act)} with weight {describe(weight)} has no deployable kernel; "
                         f"{SUPPORTED_PAIRS}")
    return scheme


def resolve_scheme(act: QConfig, weight: QConfig) -> Scheme:
    """The scheme an (act, weight) pair deploys as; ValueError naming the supported pairs otherwise."""
    w, a = weight, act
    if w.is_float:
        raise ValueError("weight dtype float quantizes nothing; exclude the layer instead")
    if w.dtype.element is not None or a.dtype.element is not None:
        return _float_format_scheme(a, w)
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
    elif a.dtype == QDType.int4 and a.scope == QScope.per_token and a.symmetric:
        if w.dtype == QDType.int4 and w.symmetric and w.scope == QScope.per_channel:
            return Scheme.W4A4_DYNAMIC
        if w.dtype == QDType.int4 and w.scope == QScope.per_group:
            raise ValueError("W4A4_DYNAMIC with per-group int4 weights does not load in vLLM-Ascend (formats.md "
                             "A.4.7: only [N, 1] weight scales); use weight scope per_channel, symmetric")
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
    def calibrated_act(self) -> bool:
        """Activations need a range from calibration: static ones, and NVFP4's global input scale."""
        return self.static_act or self.act.dtype == QDType.nvfp4

    @property
    def needs_calibration(self) -> bool:
        """Static activation ranges (NVFP4's global input scale too) and GPTQ's Hessian come from data; the
        other methods do not."""
        return self.calibrated_act or self.weight.method == "gptq"
