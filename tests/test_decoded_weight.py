"""QuantLinear.keep_decoded_weight (ir/quant_linear.py): evaluation decodes each weight once. The kept weight gives
the same outputs bit for bit as decoding at every forward, is decoded once over many forwards, and is decoded again
when a code or a scale changes in place or is replaced, or when the layer moves or is cast."""
from __future__ import annotations

import torch
from torch import nn

from msmodelslim.ir.quant_linear import QuantLinear, keep_decoded_weights
from msmodelslim.quantizer.scheme import Scheme


def weight_only_layer(seed: int = 0) -> QuantLinear:
    """W8A16 (weight only, per-group): a layer on the float path, which decodes its weight."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-127, 128, (24, 32), generator=g, dtype=torch.int8)
    scale = torch.rand(24, 2, generator=g) * 0.01 + 0.001
    return QuantLinear(Scheme.W8A16, codes, scale, torch.zeros_like(scale), torch.randn(24, generator=g))


def counting(layer: QuantLinear) -> list[int]:
    """Count the layer's weight decodes."""
    calls = [0]
    decode = layer._decode_weight

    def counted():
        calls[0] += 1
        return decode()

    layer._decode_weight = counted
    return calls


def test_kept_weight_gives_the_same_outputs_and_is_decoded_once():
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(1))
    fresh, kept = weight_only_layer(), keep_decoded_weights(nn.Sequential(weight_only_layer()))[0]
    calls = counting(kept)
    for _ in range(4):
        assert torch.equal(kept(x), fresh(x))
    assert calls[0] == 1
    assert counting(fresh) and fresh._decoded is None  # off by default: nothing kept


def test_an_in_place_change_or_a_replaced_tensor_decodes_again():
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(2))
    kept, fresh = weight_only_layer(), weight_only_layer()
    kept.keep_decoded_weight = True
    calls = counting(kept)
    kept(x)
    with torch.no_grad():
        kept.weight_scale.mul_(2.0)
        fresh.weight_scale.mul_(2.0)
    assert torch.equal(kept(x), fresh(x)) and calls[0] == 2
    with torch.no_grad():
        kept.qweight[0, 0] = -kept.qweight[0, 0]
        fresh.qweight[0, 0] = -fresh.qweight[0, 0]
    assert torch.equal(kept(x), fresh(x)) and calls[0] == 3
    kept.weight_scale = fresh.weight_scale.clone() * 3
    fresh.weight_scale = fresh.weight_scale * 3
    assert torch.equal(kept(x), fresh(x)) and calls[0] == 4
    kept.to(torch.float64)  # a cast drops the kept weight (float buffers change; the codes stay int8)
    assert kept._decoded is None
