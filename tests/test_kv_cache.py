"""KV-cache int8 (C8, `dynamic_cache`) and `kv_smooth`: the engine's arithmetic against a slow reference, the
calibrated scales against the cache transformers itself fills, round trips through both readers (Llama, Qwen2,
Qwen3), kv_smooth exact in float, layer_wise = model_wise = dp_layer_wise bytes, and the refusals (MLA,
compressed-tensors, asymmetric offsets) before any weight is read."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from helpers import MODEL_TYPE, SCHEMES, outputs_of_both_runners, quantize_variants, run_quant, small_calib, saved_tensors
from msmodelslim.app.convert import convert_ascendv1_to_compressed_tensors
from msmodelslim.core.config import parse_config
from msmodelslim.core.device import DeviceSpec
from msmodelslim.core.distributed import spawn_ranks
from msmodelslim.core.errors import ConfigError, UnsupportedError
from msmodelslim.format.ascendv1.checker import check_ascendv1
from msmodelslim.format.ascendv1.reader import load_ascendv1
from msmodelslim.format.compressed_tensors.checker import check_compressed_tensors
from msmodelslim.ir.kv_cache import KVCacheQuant
from msmodelslim.processor.kv_smooth import smooth
from msmodelslim.quantizer.kv_cache import CacheChannelRange, fake_quantize_cache
from reference_reader import load_reference_model
from tiny_models import make_tiny_model

C8 = {"type": "dynamic_cache", "qconfig": {"dtype": "int8", "scope": "per_channel", "symmetric": True,
                                           "method": "minmax"}}
KV_SMOOTH = {"type": "kv_smooth"}
W8A8_DYNAMIC = {"type": "linear_quant", "qconfig": SCHEMES["w8a8_dynamic"], "exclude": ["lm_head"]}


def write_pipeline(path, process, runner="layer_wise", dataset=None, save="ascendv1_saver"):
    spec = {"runner": runner, "process": process, "save": [{"type": save, "part_file_size": 4}]}
    if dataset:
        spec["dataset"] = dataset
    path.write_text(yaml.safe_dump({"apiversion": "modelslim_v1", "spec": spec}))
    return path


@pytest.fixture(scope="module")
def tiny_qwen3_fp32(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("qwen3_fp32"), "qwen3")


@pytest.fixture(scope="module")
def models(tiny_llama, tiny_qwen2, tiny_qwen3_fp32):
    return {"llama": tiny_llama, "qwen2": tiny_qwen2, "qwen3": tiny_qwen3_fp32}


# ---- the engine's arithmetic -------------------------------------------------------------------------------
def slow_cache_read(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Element by element, in float32 as the kernel: q = clamp(round(x/s + o), -128, 127) on the write to channel
    h·D + d, then q·s on the read (formats.md A.6). Python's round() rounds half to even, as the kernel."""
    out = torch.empty_like(x)
    batch, heads, tokens, dim = x.shape
    for b in range(batch):
        for h in range(heads):
            for t in range(tokens):
                for d in range(dim):
                    c = h * dim + d
                    s = np.float32(scale[c])
                    q = round(float(np.float32(x[b, h, t, d]) / s + np.float32(offset[c])))
                    out[b, h, t, d] = float(np.float32(min(127, max(-128, q))) * s)
    return out


def test_cache_fake_quantization_is_the_engine_arithmetic():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 4, generator=g) * 3
    scale = torch.rand(12, generator=g) * 0.05 + 0.005
    offset = torch.randint(-3, 4, (12,), generator=g).float()  # read back without it, as the engine does
    assert torch.equal(fake_quantize_cache(x, scale, offset), slow_cache_read(x, scale, offset))
    assert torch.equal(fake_quantize_cache(x, scale, torch.zeros(12)), slow_cache_read(x, scale, torch.zeros(12)))


def test_reader_simulates_the_cache_with_the_saved_scales(tiny_llama, tmp_path):
    out = tmp_path / "c8"
    run_quant(tiny_llama, out, write_pipeline(tmp_path / "c.yaml", [C8], dataset=small_calib(tmp_path)))
    saved = saved_tensors(out)
    model = load_ascendv1(out)
    seen = []
    for i, layer in enumerate(model.model.layers):
        quant = layer.self_attn.kv_cache_quant
        quant.register_forward_hook(lambda m, args, result, i=i: seen.append((i, args, result)))
    ids = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert [i for i, *_ in seen] == [0, 1]
    for i, (key, value), (key_read, value_read) in seen:
        attn = f"model.layers.{i}.self_attn"
        for x, read, proj in ((key, key_read, "k_proj"), (value, value_read, "v_proj")):
            scale, offset = saved[f"{attn}.{proj}.kv_cache_scale"], saved[f"{attn}.{proj}.kv_cache_offset"]
            assert torch.equal(read, slow_cache_read(x, scale, offset))
            assert not torch.equal(read, x)
    # the attention reads the dequantized cache: dropping the quantization changes the logits
    for layer in model.model.layers:
        layer.self_attn.kv_cache_quant.forward = lambda k, v: (k, v)
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, logits)


# ---- calibration: the scales are max|K| / 127 of what transformers writes into its own cache -----------------
def cached_absmax(source, texts: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, max |K| and max |V| per channel h·D + d over every token, read from a real DynamicCache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    maxima = None
    for text in texts:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            cache = model(input_ids=ids, use_cache=True).cache
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        per_layer = [tuple(t[0].abs().amax(dim=1).reshape(-1) for t in kv) for kv in layers]  # [H, S, D] -> [H·D]
        maxima = per_layer if maxima is None else [tuple(torch.maximum(a, b) for a, b in zip(m, p))
                                                   for m, p in zip(maxima, per_layer)]
    return maxima


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_scales_are_the_range_of_the_cache_transformers_fills(models, tmp_path, family):
    calib = small_calib(tmp_path)
    out = tmp_path / "c8"
    run_quant(models[family], out, write_pipeline(tmp_path / "c.yaml", [C8], dataset=calib), MODEL_TYPE[family])
    saved = saved_tensors(out)
    texts = [json.loads(line)["text"] for line in open(calib)]
    for i, (key_max, value_max) in enumerate(cached_absmax(models[family], texts)):
        attn = f"model.layers.{i}.self_attn"
        torch.testing.assert_close(saved[f"{attn}.k_proj.kv_cache_scale"], key_max / 127, rtol=1e-5, atol=0)
        torch.testing.assert_close(saved[f"{attn}.v_proj.kv_cache_scale"], value_max / 127, rtol=1e-5, atol=0)


# ---- round trip: both readers, the checklist ----------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_round_trip_through_both_readers(models, tmp_path, family):
    from transformers import AutoModelForCausalLM

    source = models[family]
    calib = small_calib(tmp_path)
    out, without = tmp_path / "c8", tmp_path / "no_c8"
    run_quant(source, out, write_pipeline(tmp_path / "a.yaml", [KV_SMOOTH, W8A8_DYNAMIC, C8], dataset=calib),
              MODEL_TYPE[family])
    run_quant(source, without, write_pipeline(tmp_path / "b.yaml", [KV_SMOOTH, W8A8_DYNAMIC], dataset=calib),
              MODEL_TYPE[family])
    description = json.loads((out / "quant_model_description.json").read_text())
    assert description["kv_cache_type"] == description["kv_quant_type"] == "C8"
    assert "kv_cache_type" not in json.loads((without / "quant_model_description.json").read_text())
    config = json.loads((source / "config.json").read_text())
    channels = config["num_key_value_heads"] * config.get("head_dim", config["hidden_size"] // config["num_attention_heads"])
    saved = saved_tensors(out)
    for i in range(config["num_hidden_layers"]):
        for proj in ("k_proj", "v_proj"):
            scale = saved[f"model.layers.{i}.self_attn.{proj}.kv_cache_scale"]
            offset = saved[f"model.layers.{i}.self_attn.{proj}.kv_cache_offset"]
            assert description[f"model.layers.{i}.self_attn.{proj}.kv_cache_scale"] == "C8"
            assert scale.dtype == offset.dtype == torch.float32 and list(scale.shape) == [channels]
            assert bool((scale > 0).all()) and not bool(offset.any())
    assert [f.message for f in check_ascendv1(out) if f.level == "error"] == []

    # Probed with a calibration text: random tokens would push K/V outside the calibrated ranges (clipping).
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(source)(json.loads(open(calib).readline())["text"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ours = load_ascendv1(out)(input_ids=ids).logits
        reference = load_reference_model(out)(input_ids=ids).logits
        no_c8 = load_ascendv1(without)(input_ids=ids).logits
        float_logits = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)(input_ids=ids).logits
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(ours, no_c8), "C8 changed nothing: the cache simulation is not active"
    c8_cost = (ours - no_c8).norm() / no_c8.norm()
    assert c8_cost < 0.05, f"C8 moved the logits by {c8_cost:.3f} on calibration text"
    assert (ours - float_logits).norm() / float_logits.norm() < 0.1


def test_generation_reads_the_quantized_cache(tiny_llama, tmp_path):
    """With a real cache (generation), the cache holds the dequantized K/V and decoding attends over them."""
    out = tmp_path / "c8"
    run_quant(tiny_llama, out, write_pipeline(tmp_path / "c.yaml", [C8], dataset=small_calib(tmp_path)))
    model = load_ascendv1(out)
    ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(input_ids=ids).logits[0, -1]
        cache = model(input_ids=ids[:, :-1], use_cache=True).cache
        keys = cache.layers[0].keys
        quant = model.model.layers[0].self_attn.kv_cache_quant
        assert torch.equal(keys, fake_quantize_cache(keys, quant.key_scale, quant.key_offset))  # on the int8 grid
        step = model(input_ids=ids[:, -1:], cache=cache, use_cache=True).logits[0, -1]
    torch.testing.assert_close(step, full, atol=1e-4, rtol=1e-4)


def test_checker_finds_offsets_and_missing_keys(tiny_llama, tmp_path):
    out = tmp_path / "c8"
    run_quant(tiny_llama, out, write_pipeline(tmp_path / "c.yaml", [C8], dataset=small_calib(tmp_path)))
    errors = lambda path: [f.message for f in check_ascendv1(path) if f.level == "error"]

    shifted = tmp_path / "shifted"
    shutil.copytree(out, shifted)
    (shard,) = shifted.glob("*.safetensors")
    tensors = load_file(shard)
    tensors["model.layers.1.self_attn.k_proj.kv_cache_offset"] += 1
    save_file(tensors, str(shard), metadata={"format": "pt"})
    assert any("kv_cache_offset is not zero" in e for e in errors(shifted))

    undeclared = tmp_path / "undeclared"
    shutil.copytree(out, undeclared)
    path = undeclared / "quant_model_description.json"
    description = json.loads(path.read_text())
    del description["kv_cache_type"]
    path.write_text(json.dumps(description))
    assert any("kv_cache_type is None" in e for e in errors(undeclared))


# ---- kv_smooth ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_kv_smooth_is_exact_in_float(models, tmp_path, family):
    from transformers import AutoModelForCausalLM

    source = models[family]
    out = tmp_path / "smoothed"
    run_quant(source, out, write_pipeline(tmp_path / "s.yaml", [KV_SMOOTH], dataset=small_calib(tmp_path)),
              MODEL_TYPE[family])
    original = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    smoothed = load_ascendv1(out).eval()
    fold = "k_norm" if family == "qwen3" else "k_proj"
    before = original.model.layers[0].self_attn.get_submodule(fold).weight.detach()
    after = smoothed.model.layers[0].self_attn.get_submodule(fold).weight.detach()
    ratio = (before / after).reshape(-1) if fold == "k_norm" else (before / after)[:, 0]  # s per K channel
    assert float((ratio - 1).abs().min()) > 0.1, "kv_smooth moved no scale"
    pairs = ratio.reshape(-1, 2, 8)  # head_dim 16: channel d with d + 8, which RoPE mixes
    torch.testing.assert_close(pairs[:, 0], pairs[:, 1])
    ids = torch.randint(0, original.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        delta = (original(input_ids=ids).logits - smoothed(input_ids=ids).logits).abs().max()
    assert delta < 1e-4, f"max |Δlogit| {float(delta):.2e}"


def test_kv_smooth_scales_are_gqa_aware():
    """A K head's scale multiplies the query rows of every query head in its group, equal on RoPE pairs."""
    absmax = torch.tensor([1.0, 4.0, 2.0, 3.0, 5.0, 1.0, 1.0, 8.0])  # 2 KV heads of head_dim 4
    maxima = smooth.pair_maxima(absmax, num_kv_heads=2, head_dim=4)
    assert maxima.tolist() == [[2.0, 4.0, 2.0, 4.0], [5.0, 8.0, 5.0, 8.0]]
    scales = smooth.smoothing_scales(maxima, 0.5)
    rows = smooth.query_rows(scales, num_heads=4)
    assert rows.reshape(4, 4).tolist() == [scales[0].tolist()] * 2 + [scales[1].tolist()] * 2


def _rope(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    freq = 1.0 / (10000 ** (torch.arange(half) / half))
    angle = positions[:, None] * freq[None, :]
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


def test_kv_smooth_flattens_k_outliers_for_a_per_head_quantizer_and_leaves_per_channel_c8_alone():
    """On K with outlier channels, smoothing cuts the attention-score error of a per-head int8 K (one scale per
    head, FA3's granularity) by more than half; C8's per-channel grid moves with the channel scale, so its error is
    unchanged (the codes are the same up to float rounding)."""
    g = torch.Generator().manual_seed(0)
    tokens, dim = 256, 16
    positions = torch.arange(tokens).float()
    q_pre, k_pre = torch.randn(tokens, dim, generator=g), torch.randn(tokens, dim, generator=g)
    k_pre[:, [1, 9]] *= 40  # one outlier RoPE pair
    q, k = _rope(q_pre, positions), _rope(k_pre, positions)
    scores = q @ k.T
    maxima = smooth.pair_maxima(k.abs().amax(0), 1, dim)[0]
    s = smooth.smoothing_scales(maxima, 1.0)
    q_s, k_s = _rope(q_pre * s, positions), _rope(k_pre / s, positions)
    torch.testing.assert_close(q_s @ k_s.T, scores, rtol=1e-4, atol=1e-3)  # exact before quantization

    def per_head(x):
        scale = x.abs().max() / 127
        return torch.clamp(torch.round(x / scale), -128, 127) * scale

    def per_channel(x):
        scale = (x.abs().amax(0) / 127)[None, None, None, :]
        return fake_quantize_cache(x[None, None], scale.reshape(-1), torch.zeros(dim))[0, 0]

    error = lambda qq, kq: float((qq @ kq.T - scores).abs().mean())
    assert error(q_s, per_head(k_s)) * 2 < error(q, per_head(k))  # measured: 0.30 against 0.87
    assert abs(error(q_s, per_channel(k_s)) - error(q, per_channel(k))) < 0.01 * error(q, per_channel(k))


# ---- runners: identical bytes --------------------------------------------------------------------------------
def test_layer_wise_and_model_wise_write_the_same_bytes(tiny_qwen2, tmp_path):
    layer_wise, model_wise = outputs_of_both_runners(tiny_qwen2, tmp_path, [KV_SMOOTH, W8A8_DYNAMIC, C8],
                                                     MODEL_TYPE["qwen2"])
    assert layer_wise == model_wise


def _cache_rows(rank: int) -> torch.Tensor:
    """Rank r's cache tensor [batch 1, kv_heads 2, tokens, head_dim 4]; ranks see different token counts."""
    return torch.randn(1, 2, 3 + 4 * rank, 4, generator=torch.Generator().manual_seed(rank)) * (1 + rank)


def _channel_range_worker(collective) -> dict:
    """Ranks 0 and 1 record their own K; rank 2 records nothing (it got no batch) and still joins the merge."""
    seen, unseen = CacheChannelRange(), CacheChannelRange()
    if collective.rank < 2:
        seen.update(_cache_rows(collective.rank))
    seen.merge(collective, 8)
    unseen.merge(collective, 8)
    return {"min": seen.min, "max": seen.max, "unseen": unseen.seen}


def test_channel_ranges_merged_by_ranks_equal_one_process_over_all_tokens(tmp_path):
    got = spawn_ranks("cpu", (0, 1, 2), tmp_path, _channel_range_worker)
    single = CacheChannelRange()
    single.update(_cache_rows(0))
    single.update(_cache_rows(1))
    assert torch.equal(got["min"], single.min) and torch.equal(got["max"], single.max)
    alone = CacheChannelRange()
    alone.update(_cache_rows(0))
    assert not torch.equal(got["max"], alone.max)  # rank 1's tokens count: the merge did something
    assert got["unseen"] is False  # no rank saw anything: still unseen, not +-inf


@pytest.mark.parametrize("process", [[C8], [KV_SMOOTH], [KV_SMOOTH, W8A8_DYNAMIC, C8]],
                         ids=["c8", "kv_smooth", "kv_smooth+w8a8+c8"])
def test_dp_layer_wise_merges_to_the_single_process_bytes(tiny_llama, tmp_path, process):
    """Two gloo ranks on the CPU, each with its own share of the calibration batches, write the bytes of one
    process: C8 scales from min/max all-reduced per channel, kv_smooth's fold from max|K| all-reduced."""
    path = tmp_path / "varied.jsonl"
    sentence = "Quantization maps floats to integers; apt installs package {i} on Debian. "
    path.write_text("\n".join(json.dumps({"text": sentence.format(i=i) * (1 + i % 4)}) for i in range(8)))
    outs = quantize_variants(tiny_llama, tmp_path, process, "Llama-2-7B",
                             {"single": ("auto", DeviceSpec("cpu")), "dp": ("auto", DeviceSpec("cpu", (0, 1)))},
                             str(path))
    single, dp = saved_tensors(outs["single"]), saved_tensors(outs["dp"])
    assert single.keys() == dp.keys()
    assert any("kv_cache_scale" in k for k in single) == (C8 in process)
    for name in single:
        assert torch.equal(single[name], dp[name]), name
    descriptions = [json.loads((outs[v] / "quant_model_description.json").read_text()) for v in ("single", "dp")]
    assert descriptions[0] == descriptions[1]


# ---- refusals, before any weight is read ---------------------------------------------------------------------
@pytest.fixture
def no_weight_reads(monkeypatch):
    def never(*_a, **_k):
        raise AssertionError("a weight was read before the refusal")

    monkeypatch.setattr("msmodelslim.model.checkpoint.SafetensorsCheckpoint.load", never)


@pytest.mark.parametrize("step", [C8, KV_SMOOTH], ids=["dynamic_cache", "kv_smooth"])
def test_mla_is_refused_by_name(tiny_deepseek_v3, tmp_path, no_weight_reads, step):
    with pytest.raises(UnsupportedError, match="multi-head latent attention") as info:
        run_quant(tiny_deepseek_v3, tmp_path / "out", write_pipeline(tmp_path / "c.yaml", [step]), "DeepSeek-V3")
    assert "fa3_quant" in str(info.value) and step["type"] in str(info.value)
    assert not (tmp_path / "out").exists()


def test_compressed_tensors_refuses_c8(tiny_llama, tmp_path, no_weight_reads):
    config = write_pipeline(tmp_path / "c.yaml", [W8A8_DYNAMIC, C8], save="compressed_tensors")
    with pytest.raises(UnsupportedError, match="dynamic_cache cannot be saved as compressed_tensors.*FP8.*fp8_e4m3"):
        run_quant(tiny_llama, tmp_path / "out", config)
    assert not (tmp_path / "out").exists()


# ---- vLLM's FP8 KV cache in compressed-tensors -----------------------------------------------------------------
KV_FP8 = {"type": "dynamic_cache", "qconfig": {"dtype": "fp8_e4m3", "scope": "per_tensor", "symmetric": True,
                                               "method": "minmax"}}


def test_fp8_cache_arithmetic_is_compressed_tensors_own():
    """Our FP8 cache simulation against compressed-tensors' fake_quantize with the kv_cache_scheme we write (the
    arithmetic transformers + compressed-tensors run for a checkpoint with k_scale/v_scale)."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    from msmodelslim.format.compressed_tensors.kv_cache import kv_cache_scheme
    from msmodelslim.quantizer.kv_cache import fake_quantize_cache_fp8

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, 16, generator=g) * 4
    x[0, 1, 2, 3] = 1000.0  # beyond the calibrated range: saturates at ±448·s
    scale = torch.tensor([x[x.abs() < 999].abs().max() / 448])
    ours = fake_quantize_cache_fp8(x, scale)
    theirs = fake_quantize(x, scale, None, kv_cache_scheme())
    assert torch.equal(ours, theirs)
    assert float(ours[0, 1, 2, 3]) == pytest.approx(448 * float(scale))
    assert not torch.equal(ours, x)


def vllm_accepts(kv_cache_scheme: dict) -> None:
    """The conditions vLLM's compressed-tensors KV-cache method puts on a kv_cache_scheme (its
    CompressedTensorsKVCacheMethod.validate_kv_cache_scheme): 8-bit float, strategy tensor, symmetric."""
    assert kv_cache_scheme["type"] == "float" and kv_cache_scheme["num_bits"] == 8
    assert kv_cache_scheme["strategy"] == "tensor" and kv_cache_scheme["symmetric"] is True
    assert kv_cache_scheme["dynamic"] is False


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_fp8_kv_cache_is_exported_to_compressed_tensors(models, tmp_path, family):
    """Scales: max |K| (|V|) over what transformers writes into its own cache, / 448, one per tensor; config.json
    carries the kv_cache_scheme vLLM reads; read back (transformers + our cache simulation) equal to
    transformers + compressed-tensors' arithmetic on the saved scales, and different from float."""
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from msmodelslim.format.compressed_tensors.checker import check_compressed_tensors
    from msmodelslim.format.compressed_tensors.kv_cache import load_with_kv_cache
    from msmodelslim.model.kv_cache import tap_cache_writes

    source, calib = models[family], small_calib(tmp_path)
    out = tmp_path / "ct"
    run_quant(source, out, write_pipeline(tmp_path / "c.yaml", [KV_FP8], dataset=calib, save="compressed_tensors"),
              MODEL_TYPE[family])
    quantization = json.loads((out / "config.json").read_text())["quantization_config"]
    vllm_accepts(quantization["kv_cache_scheme"])
    parsed = QuantizationConfig.model_validate(quantization)  # the library's own reading
    assert parsed.kv_cache_scheme is not None and parsed.config_groups == {}
    assert [f.message for f in check_compressed_tensors(out) if f.level == "error"] == []

    saved = saved_tensors(out)
    texts = [json.loads(line)["text"] for line in open(calib)]
    for i, (key_max, value_max) in enumerate(cached_absmax(source, texts)):
        attn = f"model.layers.{i}.self_attn"
        for suffix, absmax in (("k_scale", key_max), ("v_scale", value_max)):
            scale = saved[f"{attn}.{suffix}"]
            assert scale.dtype == torch.float32 and list(scale.shape) == [1]
            torch.testing.assert_close(scale, absmax.max().reshape(1) / 448, rtol=1e-5, atol=0)
    assert not any("kv_cache_quant" in name for name in saved)

    ids = AutoTokenizer.from_pretrained(source)(texts[0], return_tensors="pt")["input_ids"]
    independent = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    for i, layer in enumerate(independent.model.layers):
        k, v = (saved[f"model.layers.{i}.self_attn.{s}"] for s in ("k_scale", "v_scale"))
        tap_cache_writes(layer.self_attn, lambda key, value, k=k, v=v: (
            fake_quantize(key, k, None, parsed.kv_cache_scheme), fake_quantize(value, v, None, parsed.kv_cache_scheme)))
    with torch.no_grad():
        ours = load_with_kv_cache(out)(input_ids=ids).logits
        theirs = independent(input_ids=ids).logits
        float_logits = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours, float_logits), "the FP8 cache changed nothing"
    assert (ours - float_logits).norm() / float_logits.norm() < 0.05


def test_fp8_kv_cache_with_w8a8_in_one_compressed_tensors_checkpoint(tiny_llama, tmp_path):
    out = tmp_path / "ct"
    run_quant(tiny_llama, out, write_pipeline(tmp_path / "c.yaml", [W8A8_DYNAMIC, KV_FP8], dataset=small_calib(tmp_path),
                                              save="compressed_tensors"))
    quantization = json.loads((out / "config.json").read_text())["quantization_config"]
    vllm_accepts(quantization["kv_cache_scheme"])
    assert quantization["format"] == "int-quantized" and len(quantization["config_groups"]) == 1
    saved = saved_tensors(out)
    assert {n for n in saved if n.endswith(("k_scale", "v_scale"))} == {
        f"model.layers.{i}.self_attn.{s}" for i in range(2) for s in ("k_scale", "v_scale")}

    assert [f for f in check_compressed_tensors(out) if f.level == "error"] == []


def _broken_copy(out, tmp_path, name: str, edit):
    """A copy of `out` with one edit to its tensors (edit(state) -> state) or its config (edit(config))."""
    copy = tmp_path / name
    shutil.copytree(out, copy)
    if name.startswith("config"):
        config = json.loads((copy / "config.json").read_text())
        edit(config["quantization_config"])
        (copy / "config.json").write_text(json.dumps(config))
        return copy
    (shard,) = copy.glob("*.safetensors")
    save_file(edit(load_file(shard)), shard, metadata={"format": "pt"})
    return copy


def test_the_checker_finds_every_kv_cache_defect(tiny_llama, tmp_path):
    """C.2.7 on the compressed-tensors FP8 cache: a missing scale, a wrong shape, a non-positive value, a scheme
    vLLM rejects, scales without a scheme."""
    out = tmp_path / "ct"
    run_quant(tiny_llama, out, write_pipeline(tmp_path / "c.yaml", [KV_FP8], dataset=small_calib(tmp_path),
                                              save="compressed_tensors"))
    assert [f.message for f in check_compressed_tensors(out) if f.level == "error"] == []
    k1 = "model.layers.1.self_attn.k_scale"
    defects = {
        "missing": (lambda s: {k: v for k, v in s.items() if k != k1}, f"{k1} is missing"),
        "shape": (lambda s: {**s, k1: s[k1].repeat(4)}, f"{k1} must be one positive value"),
        "zero": (lambda s: {**s, k1: torch.zeros(1)}, f"{k1} must be one positive value"),
        "config_int": (lambda q: q["kv_cache_scheme"].update(type="int"), "vLLM loads only float 8-bit"),
        "config_none": (lambda q: q.update(kv_cache_scheme=None), "has no kv_cache_scheme"),
    }
    for name, (edit, expected) in defects.items():
        errors = [f.message for f in check_compressed_tensors(_broken_copy(out, tmp_path, name, edit))
                  if f.level == "error"]
        assert any(expected in e for e in errors), (name, errors)


def test_fp8_kv_cache_under_dp_layer_wise_is_the_single_process_checkpoint(tiny_llama, tmp_path):
    path = tmp_path / "varied.jsonl"
    sentence = "Quantization maps floats to integers; apt installs package {i} on Debian. "
    path.write_text("\n".join(json.dumps({"text": sentence.format(i=i) * (1 + i % 4)}) for i in range(8)))
    outs = {}
    for name, device in (("single", DeviceSpec("cpu")), ("dp", DeviceSpec("cpu", (0, 1)))):
        outs[name] = tmp_path / name
        run_quant(tiny_llama, outs[name], write_pipeline(tmp_path / f"{name}.yaml", [KV_FP8], runner="auto",
                                                         dataset=str(path), save="compressed_tensors"),
                  device=device)
    single, dp = saved_tensors(outs["single"]), saved_tensors(outs["dp"])
    assert single.keys() == dp.keys() and any(k.endswith("k_scale") for k in single)
    for name in single:
        assert torch.equal(single[name], dp[name]), name


def test_ascendv1_refuses_the_fp8_kv_cache(tiny_llama, tmp_path, no_weight_reads):
    with pytest.raises(UnsupportedError, match="dynamic_cache cannot be saved as ascendv1_saver.*C8 \\(int8"):
        run_quant(tiny_llama, tmp_path / "out", write_pipeline(tmp_path / "c.yaml", [KV_FP8]))
    assert not (tmp_path / "out").exists()


def test_convert_refuses_a_c8_checkpoint(tiny_llama, tmp_path):
    out = tmp_path / "c8"
    run_quant(tiny_llama, out, write_pipeline(tmp_path / "c.yaml", [W8A8_DYNAMIC, C8], dataset=small_calib(tmp_path)))
    with pytest.raises(UnsupportedError, match="int8 KV cache"):
        convert_ascendv1_to_compressed_tensors(out, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


@pytest.mark.parametrize("process,needle", [
    ([{**C8, "qconfig": {**C8["qconfig"], "symmetric": False}}], "dequantizes it with kv_cache_scale alone"),
    ([{**C8, "qconfig": {**C8["qconfig"], "scope": "per_tensor"}}], "dynamic_cache (C8) is int8 per_channel minmax"),
    ([{**KV_FP8, "qconfig": {**KV_FP8["qconfig"], "scope": "per_channel"}}], "dtype: fp8_e4m3, scope: per_tensor"),
    ([C8, KV_SMOOTH], "float transforms (smoothing, rotation) must come before quantization"),
    ([{**KV_SMOOTH, "smooth_factor": 0}], "smooth_factor"),
    ([{"type": "group", "configs": [KV_SMOOTH, C8]}], "holds kv_smooth and dynamic_cache"),
])
def test_config_refusals(process, needle):
    with pytest.raises(ConfigError) as info:
        parse_config({"apiversion": "modelslim_v1", "spec": {"process": process}})
    assert needle in str(info.value)


def test_ir_rejects_mismatched_tensors():
    with pytest.raises(ValueError, match="one size"):
        KVCacheQuant(torch.ones(4), torch.zeros(4), torch.ones(8), torch.zeros(8))
