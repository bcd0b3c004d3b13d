"""`QuantLinear`: a linear layer held as integer weights plus scales, whose forward computes what the serving
kernel computes (activation quantization included), in float.

This is the one representation between the algorithms (which produce it) and the formats (which write and read
it). Tensor vocabulary: `qweight` int8 [out, in] holding int8 or int4 codes (unpacked), `weight_scale` and
`weight_offset` fp32 [out, n_groups], `input_scale`/`input_offset` fp32 [1] for static activations. The
floating-point schemes hold float8_e4m3fn codes (FP8, MXFP8) or uint8 E2M1 codes, one per element (MXFP4), and
MX scales as float32 powers of two [out, in/32] (the E8M0 byte is a format detail).

W4A4_MXFP4_DUALSCALE also holds `weight_dual_scale` float32 [out, in/D] (quantizer/dualscale.py): the weight is
codes · 2^e · S_dual, and the input is quantized the same way at run time with the same D = in / its width.

W4A16_NVFP4 holds E2M1 codes (uint8, one per element), `weight_scale` float32 [out, in/16] holding the FP8 E4M3
block scales, and `weight_global_scale` float32 [1] (quantizer/nvfp4.py): the weight is q · (s_b / g).

After `svd_res` a QuantLinear also holds SVDQuant's low-rank pair (ir/lowrank.py): `svd_lowrank_l1` [r, in] and
`svd_lowrank_l2` [out, r], float32, None otherwise. The quantized weight is then the residual R, and the layer
computes Q_act(x)·deq(Q(R))ᵀ + b + (x l1ᵀ) l2ᵀ: the low-rank branch reads the unquantized input.

Behind QuaRot's online rotation (ir/online_rotation.py) a QuantLinear also holds `heads_rotation` or the pair
`kronecker_rotation_m`/`kronecker_rotation_n` (float32), and everything above reads the rotated input T·x.

Behind FlatQuant's transform (ir/flat_transform.py, W4A4_DYNAMIC and W4A4_MXFP4) it holds `left_trans`,
`right_trans` and `clip_ratio` (float32): the input is transformed to Lᵀ·X·R, then clipped per token and quantized
per token (int4) or per block of 32 (MXFP4).
"""
from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Callable, Iterator, Mapping, Optional

import torch
from torch import nn

from msmodelslim.ir.flat_transform import (CLIP_RATIO, FLAT_TENSORS, LEFT_TRANS, RIGHT_TRANS, check_flat_transform,
                                           clipped_mxfp4, clipped_per_token_int4, flat_transform,
                                           transform_input)
from msmodelslim.ir.lowrank import LOWRANK_L1, LOWRANK_L2, check_lowrank_pair, lowrank_output
from msmodelslim.ir.online_rotation import ROTATION_TENSORS, check_rotation, input_rotation, rotate_input
from msmodelslim.quantizer.dualscale import dequantize_dualscale, fake_quantize_act_dualscale
from msmodelslim.quantizer.nvfp4 import NVFP4_BLOCK, dequantize_nvfp4, fake_quantize_act_nvfp4
from msmodelslim.quantizer.float_formats import MX_BLOCK, code_values, fp8_fake_quantize_per_token, mx_fake_quantize
from msmodelslim.quantizer.primitives import (dequantize_weight, fake_quantize_input, per_token_codes,
                                             quantize_per_token_dynamic)
from msmodelslim.quantizer.scheme import Scheme

WEIGHT_BITS = {Scheme.W8A8: 8, Scheme.W8A8_DYNAMIC: 8, Scheme.W8A16: 8, Scheme.W4A16: 4, Scheme.W4A8_DYNAMIC: 4,
               Scheme.W4A4_DYNAMIC: 4, Scheme.W8A8_MIX: 8, Scheme.W8A8S: 8, Scheme.W8A8FP8_DYNAMIC: 8, Scheme.W8A8_MXFP8: 8,
               Scheme.W4A8_MXFP: 4, Scheme.W4A4_MXFP4: 4, Scheme.W4A16_MXFP4: 4, Scheme.W4A4_MXFP4_DUALSCALE: 4,
               Scheme.W4A16_NVFP4: 4, Scheme.W4A4_NVFP4: 4}
# How each floating-point scheme holds its weight codes (int schemes hold int8 codes) and what its kernel does
# to the input at run time: per-token FP8, or MX per block of 32 with this element format.
CODE_DTYPE = {Scheme.W8A8FP8_DYNAMIC: torch.float8_e4m3fn, Scheme.W8A8_MXFP8: torch.float8_e4m3fn,
              Scheme.W4A8_MXFP: torch.uint8, Scheme.W4A4_MXFP4: torch.uint8, Scheme.W4A16_MXFP4: torch.uint8,
              Scheme.W4A4_MXFP4_DUALSCALE: torch.uint8, Scheme.W4A16_NVFP4: torch.uint8,
              Scheme.W4A4_NVFP4: torch.uint8}
MX_SCHEMES = (Scheme.W8A8_MXFP8, Scheme.W4A8_MXFP, Scheme.W4A4_MXFP4, Scheme.W4A16_MXFP4, Scheme.W4A4_MXFP4_DUALSCALE)
DUAL_SCALE = "weight_dual_scale"
GLOBAL_SCALE = "weight_global_scale"
NVFP4_SCHEMES = (Scheme.W4A16_NVFP4, Scheme.W4A4_NVFP4)
INPUT_GLOBAL_SCALE = "input_global_scale"
MX_ACT = {Scheme.W8A8_MXFP8: "fp8_e4m3", Scheme.W4A8_MXFP: "fp8_e4m3", Scheme.W4A4_MXFP4: "fp4_e2m1"}
STATIC_ACT = (Scheme.W8A8, Scheme.W8A8_MIX, Scheme.W8A8S)  # schemes that carry a calibrated input range
FLAT_SCHEMES = (Scheme.W4A4_DYNAMIC, Scheme.W4A4_MXFP4)  # behind FlatQuant's transform (formats.md A.4.8)


def run_time_input_quantizer(scheme: Scheme, dual_block_size: Optional[int] = None,
                             flat: Optional[Mapping[str, torch.Tensor]] = None
                             ) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """What the kernel does to the input of `scheme` at run time from the input alone (per token or per block,
    nothing calibrated): a fake-quantizing function, or None when the input stays float or needs a calibrated
    range (static int8, W8A8_MIX's decode path, NVFP4's global scale). `flat`: a FlatQuant layer's transform
    tensors (ir/flat_transform.py); aclnnFlatQuant clips each transformed token by the learned ratio, then
    quantizes it to int4 per token, or MXFP4 per block of 32 for W4A4_MXFP4."""
    if flat:
        clipped = clipped_mxfp4 if scheme == Scheme.W4A4_MXFP4 else clipped_per_token_int4
        clip_ratio = flat[CLIP_RATIO]
        return lambda x: clipped(x, clip_ratio).to(x.dtype)
    if scheme in (Scheme.W8A8_DYNAMIC, Scheme.W4A8_DYNAMIC):
        return partial(quantize_per_token_dynamic, bits=8)
    if scheme == Scheme.W4A4_DYNAMIC:  # s_t = max|x_t| / 7, codes clamped to -8..7
        return partial(quantize_per_token_dynamic, bits=4)
    if scheme == Scheme.W8A8FP8_DYNAMIC:
        return fp8_fake_quantize_per_token
    if scheme == Scheme.W4A4_MXFP4_DUALSCALE and dual_block_size is not None:
        return partial(fake_quantize_act_dualscale, dual_block_size=dual_block_size)
    if scheme in MX_ACT:
        return partial(mx_fake_quantize, element=MX_ACT[scheme])
    return None


class QuantLinear(nn.Module):
    def __init__(
        self,
        scheme: Scheme,
        qweight: torch.Tensor,
        weight_scale: torch.Tensor,
        weight_offset: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        input_scale: Optional[torch.Tensor] = None,
        input_offset: Optional[torch.Tensor] = None,
        svd_lowrank_l1: Optional[torch.Tensor] = None,
        svd_lowrank_l2: Optional[torch.Tensor] = None,
        weight_dual_scale: Optional[torch.Tensor] = None,
        weight_global_scale: Optional[torch.Tensor] = None,
        input_global_scale: Optional[torch.Tensor] = None,
        rotation: Optional[Mapping[str, torch.Tensor]] = None,
        flat: Optional[Mapping[str, torch.Tensor]] = None,
    ) -> None:
        super().__init__()
        code_dtype = CODE_DTYPE.get(scheme, torch.int8)
        if qweight.dtype != code_dtype or qweight.dim() != 2:
            raise ValueError(f"{scheme.value} qweight must be a 2-D {code_dtype} tensor of codes")
        if weight_scale.shape != weight_offset.shape or weight_scale.shape[0] != qweight.shape[0]:
            raise ValueError("weight_scale/weight_offset must both be [out, n_groups]")
        if (scheme in STATIC_ACT) != (input_scale is not None):
            raise ValueError("static activation parameters are required for W8A8, W8A8_MIX and W8A8S and only for them")
        if (scheme == Scheme.W4A4_MXFP4_DUALSCALE) != (weight_dual_scale is not None):
            raise ValueError(f"{DUAL_SCALE} is required for W4A4_MXFP4_DUALSCALE and only for it")
        if weight_dual_scale is not None and (
                weight_dual_scale.dim() != 2 or weight_dual_scale.shape[0] != qweight.shape[0]
                or qweight.shape[1] % weight_dual_scale.shape[1] or (qweight.shape[1] // weight_dual_scale.shape[1]) % MX_BLOCK):
            raise ValueError(f"{DUAL_SCALE} must be [out, in/D] with D a multiple of {MX_BLOCK} dividing in, got "
                             f"{list(weight_dual_scale.shape)} for a weight {list(qweight.shape)}")
        if (scheme in NVFP4_SCHEMES) != (weight_global_scale is not None):
            raise ValueError(f"{GLOBAL_SCALE} is required for the NVFP4 schemes and only for them")
        if weight_global_scale is not None and (weight_global_scale.numel() != 1
                                                or weight_scale.shape[1] * NVFP4_BLOCK != qweight.shape[1]):
            raise ValueError(f"NVFP4 needs one global scale and weight_scale [out, in/{NVFP4_BLOCK}]")
        if (scheme == Scheme.W4A4_NVFP4) != (input_global_scale is not None):
            raise ValueError(f"{INPUT_GLOBAL_SCALE} is required for W4A4_NVFP4 and only for it")
        if (svd_lowrank_l1 is None) != (svd_lowrank_l2 is None):
            raise ValueError(f"{LOWRANK_L1} and {LOWRANK_L2} come together or not at all")
        if svd_lowrank_l1 is not None:
            check_lowrank_pair(svd_lowrank_l1, svd_lowrank_l2, qweight.shape[0], qweight.shape[1])
        if rotation:
            check_rotation(rotation, qweight.shape[1])
        if flat:
            if scheme not in FLAT_SCHEMES or rotation or svd_lowrank_l1 is not None:
                raise ValueError(f"a FlatQuant transform goes with W4A4_DYNAMIC or W4A4_MXFP4 alone (no online "
                                 f"rotation, no low-rank branch), not {scheme.value}")
            check_flat_transform(flat, qweight.shape[1], mxfp4=scheme == Scheme.W4A4_MXFP4)
        self.scheme = scheme
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]
        self.register_buffer("qweight", qweight)
        self.register_buffer("weight_scale", weight_scale.float())
        self.register_buffer("weight_offset", weight_offset.float())
        self.register_buffer("bias", None if bias is None else bias.float())
        self.register_buffer("input_scale", None if input_scale is None else input_scale.float().reshape(1))
        self.register_buffer("input_offset", None if input_offset is None else input_offset.float().reshape(1))
        self.register_buffer(GLOBAL_SCALE, None if weight_global_scale is None
                             else weight_global_scale.float().reshape(1))
        self.register_buffer(INPUT_GLOBAL_SCALE, None if input_global_scale is None
                             else input_global_scale.float().reshape(1))
        self.register_buffer(DUAL_SCALE, None if weight_dual_scale is None else weight_dual_scale.float())
        self.register_buffer(LOWRANK_L1, None if svd_lowrank_l1 is None else svd_lowrank_l1.float())
        self.register_buffer(LOWRANK_L2, None if svd_lowrank_l2 is None else svd_lowrank_l2.float())
        for name in ROTATION_TENSORS:
            matrix = (rotation or {}).get(name)
            self.register_buffer(name, None if matrix is None else matrix.float().contiguous())
        for name in FLAT_TENSORS:
            tensor = (flat or {}).get(name)
            self.register_buffer(name, None if tensor is None else tensor.float().reshape(
                (1,) if name == CLIP_RATIO else tensor.shape).contiguous())
        # W8A8_MIX runs two kernels: decode nodes quantize inputs with the static range, the others per token.
        # Prefill (and perplexity, which scores whole sequences at once) is the dynamic path, the default here.
        self.decode_path = False
        # Read-back for evaluation decodes the weight once (keep_decoded_weight); the codes stay the stored truth.
        self.keep_decoded_weight = False
        self._decoded: Optional[tuple[tuple, torch.Tensor]] = None
        self._integer_key: Optional[tuple] = None  # weight versions the integer-kernel eligibility was checked on
        self._integer_ok = False
        self.input_codes: Optional[LastInputCodes] = None  # shared by a model's layers at read-back

    @property
    def weight_bits(self) -> int:
        return WEIGHT_BITS[self.scheme]

    @property
    def group_size(self) -> Optional[int]:
        """None for per-channel parameters."""
        if self.scheme in MX_SCHEMES:
            return MX_BLOCK  # also when the input size is one block
        if self.scheme in NVFP4_SCHEMES:
            return NVFP4_BLOCK
        n_groups = self.weight_scale.shape[1]
        return None if n_groups == 1 else self.in_features // n_groups

    @property
    def svd_rank(self) -> Optional[int]:
        """The rank of the low-rank branch; None without one."""
        return None if self.svd_lowrank_l1 is None else self.svd_lowrank_l1.shape[0]

    @property
    def dual_block_size(self) -> Optional[int]:
        """D of W4A4_MXFP4_DUALSCALE (the input size when the layer is one dual block), None otherwise."""
        return None if self.weight_dual_scale is None else self.in_features // self.weight_dual_scale.shape[1]

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight the codes and scales stand for. With keep_decoded_weight it is decoded once and kept
        until a weight tensor is replaced or changed in place (keyed by storage and torch's version counters)."""
        if not self.keep_decoded_weight:
            self._decoded = None
            return self._decode_weight()
        sources = (self.qweight, self.weight_scale, self.weight_offset, self.weight_dual_scale, self.weight_global_scale)
        key = tuple((t.data_ptr(), t._version, t.device) for t in sources if t is not None)
        if self._decoded is None or self._decoded[0] != key:
            self._decoded = (key, self._decode_weight())
        return self._decoded[1]

    def _decode_weight(self) -> torch.Tensor:
        if self.weight_global_scale is not None:
            return dequantize_nvfp4(code_values(self.qweight), self.weight_scale, self.weight_global_scale)
        if self.weight_dual_scale is not None:
            return dequantize_dualscale(code_values(self.qweight), self.weight_scale, self.weight_dual_scale)
        return dequantize_weight(code_values(self.qweight), self.weight_scale, self.weight_offset)

    def _apply(self, fn, *args, **kwargs):
        self._decoded = None  # moved or cast: the kept weight would be a stale copy on the old device
        return super()._apply(fn, *args, **kwargs)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.scheme in (Scheme.W8A8, Scheme.W8A8S) or (self.scheme == Scheme.W8A8_MIX and self.decode_path):
            return fake_quantize_input(x, self.input_scale, self.input_offset, 8)
        if self.scheme == Scheme.W8A8_MIX:
            return quantize_per_token_dynamic(x, 8)
        if self.scheme == Scheme.W4A4_NVFP4:
            return fake_quantize_act_nvfp4(x, self.input_global_scale)
        quantizer = run_time_input_quantizer(self.scheme, self.dual_block_size, flat_transform(self))
        return x if quantizer is None else quantizer(x)

    def integer_kernel_applies(self, x: torch.Tensor) -> bool:
        """Per-token int8 inputs times symmetric per-channel int weights on a CPU: the layer computes what the
        serving kernel computes, exact integer sums scaled once (formats.md A.4.3), with torch's int8 matmul. Not
        with an online rotation or a low-rank branch, nor when a caller replaced quantize_input on the instance."""
        dynamic = self.scheme in (Scheme.W8A8_DYNAMIC, Scheme.W4A8_DYNAMIC) or (
            self.scheme == Scheme.W8A8_MIX and not self.decode_path)
        return (dynamic and x.device.type == "cpu" and "quantize_input" not in self.__dict__
                and self._integer_weights())

    def _integer_weights(self) -> bool:
        """Per-channel symmetric codes, no rotation, no low-rank branch. Kept per version of the weight tensors:
        the check costs more than a one-token integer product (generation calls it 200 times per token)."""
        key = tuple((t.data_ptr(), t._version) for t in (self.weight_scale, self.weight_offset))
        if self._integer_key != key:
            self._integer_key = key
            self._integer_ok = (self.weight_scale.shape[1] == 1 and self.svd_lowrank_l1 is None
                                and not input_rotation(self) and not bool(self.weight_offset.any()))
        return self._integer_ok

    def _integer_forward(self, x: torch.Tensor) -> torch.Tensor:
        """out = float32(Σ_k c_x·q_w) · s_x · s_w + bias, with c_x = clamp(round(x / s_x)) and s_x = max|x_t| / 127:
        the codes of quantize_per_token_dynamic, their products summed exactly in int32."""
        codes, scale = (self.input_codes or LastInputCodes()).int8_codes(x)
        sums = torch._int_mm(codes, self.qweight.t())
        out = torch.mul(sums, scale).mul_(self.weight_scale.reshape(1, -1))  # int32 sums promoted to float32
        if self.bias is not None:
            out.add_(self.bias)
        return out.reshape(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_dtype = x.dtype
        if self.integer_kernel_applies(x):
            return self._integer_forward(x).to(out_dtype)
        x = rotate_input(x.float(), input_rotation(self))
        flat = flat_transform(self)
        if flat:
            x = transform_input(x, flat[LEFT_TRANS], flat[RIGHT_TRANS])
        out = nn.functional.linear(self.quantize_input(x), self.dequantized_weight(), self.bias)
        if self.svd_lowrank_l1 is not None:  # SVDQuant: the high-precision branch sees the float input
            out = out + lowrank_output(x, self.svd_lowrank_l1, self.svd_lowrank_l2)
        return out.to(out_dtype)

    def extra_repr(self) -> str:
        group = "per_channel" if self.group_size is None else f"group_size={self.group_size}"
        lowrank = "" if self.svd_rank is None else f", svd_rank={self.svd_rank}"
        rotated = "".join(f", {name}" for name in (*input_rotation(self), *flat_transform(self)))
        return f"{self.scheme.value}, in={self.in_features}, out={self.out_features}, {group}{lowrank}{rotated}"


class LastInputCodes:
    """The int8 per-token codes of the last input quantized, for the layers that read the same tensor next: q, k
    and v (gate and up) get the same hidden states, and at one token per step quantizing them costs more than the
    integer product itself. It holds that input, so that its storage cannot be reused by another tensor; an
    in-place change of it (its version) makes the codes be computed again."""

    def __init__(self) -> None:
        self._last: Optional[tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]] = None

    def int8_codes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(int8 codes [tokens, in], float32 scales [tokens, 1]) of quantize_per_token_dynamic(x, 8)."""
        last = self._last
        if last is not None and last[0] is x and last[1] == x._version:
            return last[2], last[3]
        codes, scale = per_token_codes(x.reshape(-1, x.shape[-1]), 8)
        self._last = (x, x._version, codes.to(torch.int8), scale)
        return self._last[2], self._last[3]


@contextmanager
def decoded_weights_kept(module: nn.Module) -> Iterator[nn.Module]:
    """keep_decoded_weights for the span of the block, then the decoded copies are dropped (the codes stay)."""
    layers = [m for m in module.modules() if isinstance(m, QuantLinear) and not m.keep_decoded_weight]
    for layer in layers:
        layer.keep_decoded_weight = True
    try:
        yield module
    finally:
        for layer in layers:
            layer.keep_decoded_weight, layer._decoded = False, None


def keep_decoded_weights(model: nn.Module) -> nn.Module:
    """Every QuantLinear of `model` decodes its weight once, at its first forward, and keeps it: evaluation and
    generation then cost what the float model costs, at the float model's memory (plus the codes). Layers on the
    integer path that read the same input tensor quantize it once (LastInputCodes)."""
    shared = LastInputCodes()
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.keep_decoded_weight = True
            module.input_codes = shared
    return model
