"""Bit layouts of the ascendv1 format: pack/unpack round trips and hand-checked bytes."""
import struct

import pytest
import torch

from msmodelslim.format.ascendv1.tensors import (
    decode_deq_scale, encode_deq_scale, pack_int4_int32, pack_int4_rows, scale_bias, unpack_int4_int32,
    unpack_int4_rows,
)


def random_int4(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)


def test_w4a8_row_packing_round_trip_and_layout():
    q = random_int4(6, 10)
    packed = pack_int4_rows(q)
    assert packed.shape == (3, 10) and packed.dtype == torch.int8
    assert torch.equal(unpack_int4_rows(packed), q)
    # byte[j,k] = high nibble row 2j+1, low nibble row 2j (two's complement nibbles)
    q2 = torch.tensor([[-1], [2]], dtype=torch.int8)
    assert pack_int4_rows(q2).item() == struct.unpack("b", bytes([0x2F]))[0]


def test_w4a16_int32_packing_round_trip_and_layout():
    q = random_int4(4, 16, seed=3)
    packed = pack_int4_int32(q)
    assert packed.shape == (4, 2) and packed.dtype == torch.int32
    assert torch.equal(unpack_int4_int32(packed), q)
    # first element in the lowest nibble, stored offset by +8
    row = torch.tensor([[-8, -7, 0, 0, 0, 0, 0, 7]], dtype=torch.int8)
    expected = (0 + 1 * 16 + 8 * 16**2 + 8 * 16**3 + 8 * 16**4 + 8 * 16**5 + 8 * 16**6 + 15 * 16**7) - 2**32
    assert pack_int4_int32(row).item() == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_deq_scale_int64_bit_pattern(dtype):
    deq = torch.tensor([1.5e-4, 2.0, 3.25e-6])
    stored = encode_deq_scale(deq, dtype)
    assert stored.dtype == torch.int64
    assert stored[1].item() == struct.unpack("<i", struct.pack("<f", 2.0))[0]
    assert torch.equal(decode_deq_scale(stored), deq)


def test_deq_scale_float32_for_bf16_models():
    deq = torch.tensor([0.5, 0.25])
    stored = encode_deq_scale(deq, torch.bfloat16)
    assert stored.dtype == torch.float32 and torch.equal(stored, deq)


def test_scale_bias_shapes_and_values():
    w = torch.arange(32, dtype=torch.float32).reshape(2, 16)
    col = scale_bias(w, row_parallel=False)
    row = scale_bias(w, row_parallel=True)
    assert col.shape == (2, 1) and col[0, 0].item() == 8 * sum(range(16))
    assert row.shape == (2, 16) and torch.equal(row, 8 * w)
