"""The chunked min/max weight quantizer (quantizer/primitives.py) gives the codes, scales and offsets of the
plain full-tensor formulation, bit for bit; the huge-page float32 widening on load gives `t.float()`; `all_finite`'s
one-sum shortcut agrees with the element-wise check; the prefetch's WILLNEED hints cover each tensor in
readahead-window pieces.

The reference below is the formulation the project used before the chunked path: widen the whole weight to
float32, min/max per row (or group), one float32 division, round half to even, add the offset, clamp, int8.
"""
from __future__ import annotations

import pytest
import torch

from msmodelslim.core.memory import empty_on_huge_pages
from msmodelslim.quantizer import primitives
from msmodelslim.quantizer.primitives import quantize_in_row_chunks, quantize_weight_minmax


def reference_minmax(w: torch.Tensor, bits: int, symmetric: bool, group_size: int | None):
    w = w.float()
    out_features, in_features = w.shape
    size = in_features if group_size is None else group_size
    groups = w.reshape(out_features, in_features // size, size)
    lo = torch.minimum(groups.amin(dim=-1), torch.zeros(()))
    hi = torch.maximum(groups.amax(dim=-1), torch.zeros(()))
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    tiny = torch.finfo(torch.float32).tiny
    if symmetric:
        scale = (torch.maximum(-lo, hi) / qmax).clamp(min=tiny)
        offset = torch.zeros_like(scale)
    else:
        scale = ((hi - lo) / (qmax - qmin)).clamp(min=tiny)
        offset = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    q = torch.round(groups / scale.unsqueeze(-1)) + offset.unsqueeze(-1)
    return q.clamp(qmin, qmax).to(torch.int8).reshape(w.shape), scale, offset


def weight_with_traps(rows: int, cols: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random rows plus: a row of zeros, a row of -0.0, a single-element outlier row, and rows whose values land
    exactly on k + 0.5 after the division by their scale (max|w| = 127 * s with s a power of two)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[0] = 0.0
    w[1] = -0.0
    w[2] = 0.0
    w[2, cols // 2] = -3.0
    s = 2.0**-8  # row max 127 * s: the scale is exactly s, and (k + 0.5) * s divides back to k + 0.5
    halves = (torch.randint(-120, 120, (cols,), generator=g) + 0.5) * s
    halves[0] = 127 * s
    w[3] = halves
    w[4] = -halves
    w[5, : cols // 2] = 1e-30  # tiny and subnormal-adjacent values
    return w.to(dtype)


SHAPES = [(7, 13), (37, 96), (129, 250), (300, 64)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bits,symmetric", [(8, True), (8, False), (4, True), (4, False)])
def test_per_channel_matches_reference(dtype, shape, bits, symmetric):
    w = weight_with_traps(*shape, dtype=dtype, seed=shape[0])
    expected = reference_minmax(w, bits, symmetric, None)
    got = quantize_weight_minmax(w, bits, symmetric)
    for a, b in zip(got, expected):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bits,symmetric", [(8, True), (8, False), (4, False)])
def test_per_group_matches_reference(dtype, bits, symmetric):
    w = weight_with_traps(33, 96, dtype=dtype, seed=1)
    for group in (16, 32, 96):
        for a, b in zip(quantize_weight_minmax(w, bits, symmetric, group), reference_minmax(w, bits, symmetric, group)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("chunk_bytes", [1, 64, 1000, 4 * 96 * 5 + 1, 1 << 30])
def test_chunk_boundaries_do_not_matter(chunk_bytes):
    """One row per chunk, a partial last chunk, a single chunk: all give the reference codes."""
    w = weight_with_traps(41, 96, dtype=torch.bfloat16, seed=2)
    codes, scale, offset = reference_minmax(w, 8, False, 32)
    groups = w.reshape(41, 3, 32)
    got = quantize_in_row_chunks(groups, scale.unsqueeze(-1), offset.unsqueeze(-1), 8, chunk_bytes)
    assert torch.equal(got.reshape(w.shape), codes)


def test_half_steps_round_to_even():
    """The trap rows do hit exact halves, and they round half to even (so the test above can tell)."""
    w = weight_with_traps(8, 64, dtype=torch.float32, seed=3)
    codes, scale, _ = quantize_weight_minmax(w, 8, True)
    assert scale[3, 0] == 2.0**-8
    ratio = w[3] / scale[3]
    half = ratio - ratio.floor() == 0.5
    assert half.sum() > 10
    assert torch.equal(codes[3][half].float(), torch.round(ratio[half]))
    assert bool((codes[3][half] % 2 == 0).all())


def test_many_default_size_chunks():
    """A large weight spanning many default-size chunks (several MB of float32)."""
    w = (torch.randn(1500, 1024, generator=torch.Generator().manual_seed(4)) * 0.02).bfloat16()
    w[700] = 0.0
    assert w.shape[0] * w.shape[1] * 4 > 2 * primitives.CHUNK_BYTES
    for a, b in zip(quantize_weight_minmax(w, 8, True), reference_minmax(w, 8, True, None)):
        assert torch.equal(a, b)


def test_will_need_hints_are_window_sized_and_cover_each_span(tmp_path, monkeypatch):
    """Linux honours one readahead window per WILLNEED call, so the prefetch hints each tensor's bytes in pieces
    of at most WILL_NEED_PIECE, back to back, exactly covering the span."""
    import os

    from msmodelslim.model import checkpoint

    (tmp_path / "a.safetensors").write_bytes(b"\0" * 16)
    calls = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, length, advice: calls.append((offset, length, advice)))
    piece = checkpoint.WILL_NEED_PIECE
    spans = [(100, 100 + 3 * piece + 7), (5 * piece, 6 * piece), (10, 11)]
    checkpoint._advise_will_need(tmp_path, {"a.safetensors": spans})
    assert all(advice == os.POSIX_FADV_WILLNEED and 0 < length <= piece for _, length, advice in calls)
    covered, i = [], 0
    for start, end in spans:
        position = start
        while position < end:
            offset, length, _ = calls[i]
            assert offset == position
            position, i = offset + length, i + 1
        covered.append(position)
    assert covered == [end for _, end in spans] and i == len(calls) == 4 + 1 + 1


def reference_all_finite(t: torch.Tensor) -> bool:
    return not t.is_floating_point() or bool(torch.isfinite(t.double()).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.float8_e4m3fn])
def test_all_finite_agrees_with_elementwise_check(dtype):
    """The one-sum shortcut: NaN, +Inf, -Inf, both infinities (their sum is NaN) anywhere give False; finite
    values whose sum overflows still give True (settled element by element)."""
    n = 3 * 1000 + 7
    big = torch.finfo(dtype).max
    f64 = dict(dtype=torch.float64)
    cases = {"random": torch.randn(n, **f64), "zeros": torch.zeros(n, **f64), "empty": torch.zeros(0, **f64),
             "overflowing sum": torch.full((n,), big, **f64),
             "overflowing both ways": torch.tensor([big, big, -big, -big] * 9, **f64)}
    for position in (0, 999, 1000, n - 1):
        for bad in ([float("nan")], [float("inf")], [float("-inf")], [float("inf"), float("-inf")]):
            t = torch.full((n,), big if position == 999 else 1.0, **f64)
            for k, value in enumerate(bad):
                t[(position + 17 * k) % n] = value
            cases[f"{bad} at {position}"] = t
    for name, t in cases.items():
        t = t.to(dtype) if dtype != torch.float8_e4m3fn else t.clamp(-448, 448).to(dtype)
        got = primitives.all_finite(t, chunk=1000)
        assert got == reference_all_finite(t), (name, got)
    assert primitives.all_finite(torch.tensor([1, 2], dtype=torch.int8))


def test_thread_count_is_restored():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        quantize_weight_minmax(weight_with_traps(40, 64, torch.bfloat16, seed=6), 8, True)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("shape", [(), (0, 5), (3,), (1024, 1031), (5, 2, 300000)])
def test_huge_page_widening_equals_float(shape):
    from msmodelslim.model.transformers_model import _float32

    t = torch.randn(shape, generator=torch.Generator().manual_seed(5)).bfloat16()
    wide = empty_on_huge_pages(t.shape, torch.float32).copy_(t)
    assert wide.dtype == torch.float32 and wide.is_contiguous()
    assert torch.equal(wide, t.float())
    assert torch.equal(_float32(t), t.float()) and _float32(t).dtype == torch.float32
    kept = t.float()
    assert _float32(kept) is kept  # float32 stays as it is, as t.float() leaves it


def test_layer_wise_prefetches_each_next_block_then_the_tables(tiny_llama, tmp_path, monkeypatch):
    """While block i is processed the hints name block i+1's tensors; during the last block they name the
    released tables (embedding, norm, untied head) that are read back next to be written."""
    from helpers import SCHEMES, run_quant, small_calib, write_config

    from msmodelslim.model.checkpoint import SafetensorsCheckpoint

    hinted: list[list[str]] = []
    monkeypatch.setattr(SafetensorsCheckpoint, "prefetch", lambda self, names: hinted.append(list(names)))
    config = write_config(tmp_path / "c.yaml", SCHEMES["w8a8_dynamic"], dataset=small_calib(tmp_path))
    run_quant(tiny_llama, tmp_path / "out", config)
    layers = sorted({n.split(".")[2] for n in SafetensorsCheckpoint(tiny_llama).names() if ".layers." in n}, key=int)
    assert len(hinted) == len(layers)  # blocks 1.. and then the tables
    for layer, names in zip(layers[1:], hinted):
        assert names and all(n.startswith(f"model.layers.{layer}.") for n in names)
    tables = set(hinted[-1])
    assert "model.embed_tokens.weight" in tables and "model.norm.weight" in tables
    assert not any(".layers." in n for n in tables)


def test_tensors_off_the_cpu_stay_on_their_device():
    """The chunked and huge-page paths are CPU-only; an accelerator's tensor (the meta device stands in for one:
    shapes and dtypes only) is quantized and widened where it lives, not copied into host memory."""
    from msmodelslim.model.transformers_model import _float32

    w = torch.empty(37, 64, dtype=torch.bfloat16, device="meta")
    q, scale, offset = quantize_weight_minmax(w, 8, False, None)
    assert (q.device.type, scale.device.type, offset.device.type) == ("meta", "meta", "meta")
    assert q.dtype == torch.int8 and q.shape == w.shape
    widened = _float32(w)
    assert widened.device.type == "meta" and widened.dtype == torch.float32
