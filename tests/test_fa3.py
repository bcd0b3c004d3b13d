"""FA3 attention quantization (`fa3_quant`): the per-head int8 arithmetic against a slow reference, the rewiring
exact in float (dense and MLA's absorbed latent attention), the calibrated scales against the tensors transformers
itself produces, round trips through both readers (Llama, Qwen3, DeepSeek-V3), layer_wise = model_wise =
dp_layer_wise bytes, the dynamic per_token spelling, and the refusals before any weight is read."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from helpers import MODEL_TYPE, SCHEMES, outputs_of_both_runners, quantize_variants, run_quant, small_calib, saved_tensors
from msmodelslim.core.config import parse_config
from msmodelslim.core.device import DeviceSpec
from msmodelslim.core.distributed import spawn_ranks
from msmodelslim.core.errors import ConfigError, UnsupportedError
from msmodelslim.format.ascendv1.checker import check_ascendv1
from msmodelslim.format.ascendv1.reader import load_ascendv1
from msmodelslim.ir.fa3 import BRANCHES, FA3HeadQuant
from msmodelslim.model.fa3 import install_fa3
from msmodelslim.processor.fa3_quant.config import FA3QuantConfig
from msmodelslim.processor.fa3_quant.processor import quant_type_string
from msmodelslim.quantizer.fa3 import HeadRange, fake_quantize_heads
from reference_reader import load_reference_model
from tiny_models import make_tiny_model

FA3 = {"type": "fa3_quant"}
W8A8_DYNAMIC = {"type": "linear_quant", "qconfig": SCHEMES["w8a8_dynamic"], "exclude": ["lm_head"]}
FAMILIES = {"llama": "Llama-2-7B", "qwen3": "Qwen3-8B", "deepseek_v3": "DeepSeek-V3"}


def write_pipeline(path, process, runner="layer_wise", dataset=None, save="ascendv1_saver"):
    spec = {"runner": runner, "process": process, "save": [{"type": save, "part_file_size": 4}]}
    if dataset:
        spec["dataset"] = dataset
    path.write_text(yaml.safe_dump({"apiversion": "modelslim_v1", "spec": spec}))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return {family: make_tiny_model(tmp_path_factory.mktemp(family), family) for family in FAMILIES}


def ids_of(vocab: int, tokens: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(seed))


def float_model(source):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()


# ---- the kernel's arithmetic --------------------------------------------------------------------------------
def slow_fa3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Element by element in float32: q = clamp(round(x / s_h), -128, 127), read back as q · s_h (formats.md A.6).
    Python's round() rounds half to even, as the kernel."""
    out = torch.empty_like(x)
    batch, heads, tokens, dim = x.shape
    for b in range(batch):
        for h in range(heads):
            s = np.float32(scale[h, 0])
            for t in range(tokens):
                for d in range(dim):
                    q = round(float(np.float32(x[b, h, t, d]) / s))
                    out[b, h, t, d] = float(np.float32(min(127, max(-128, q))) * s)
    return out


def test_per_head_fake_quantization_is_the_kernel_arithmetic():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 4, generator=g) * 3
    scale = torch.rand(3, 1, generator=g) * 0.03 + 0.005  # small enough that some values clip
    got = fake_quantize_heads(x, scale)
    assert torch.equal(got, slow_fa3(x, scale))
    assert bool((got.abs() == 128 * scale.reshape(1, 3, 1, 1)).any())  # clipping is exercised


def test_head_ranges_give_symmetric_minmax_scales_over_every_token():
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(1, 3, n, 4, generator=g) * (h + 1) for h, n in enumerate((2, 5))]
    observed = HeadRange()
    for x in chunks:
        observed.update(x)
    scale, offset = observed.qparams()
    everything = torch.cat(chunks, dim=2)
    expected = torch.stack([everything[:, h].abs().max() / 127 for h in range(3)]).reshape(3, 1)
    torch.testing.assert_close(scale, expected, rtol=0, atol=0)
    assert scale.shape == (3, 1) and not bool(offset.any())


@pytest.mark.parametrize("dtypes, expected", [
    (("int8", "per_head"), "INT8"),
    (("int8", "per_token"), "INT8_DYNAMIC"),
])
def test_quant_type_strings(dtypes, expected):
    dtype, scope = dtypes
    config = FA3QuantConfig(type="fa3_quant", qconfig={"dtype": dtype, "scope": scope})
    assert quant_type_string(config) == expected


# ---- the rewiring is exact in float -----------------------------------------------------------------------
class Recorder(nn.Module):
    """Identity placeholder that keeps what passes."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return x


@pytest.mark.parametrize("family", list(FAMILIES))
def test_rewiring_with_identity_placeholders_is_exact(models, family):
    """Q/K/V routed through the placeholders (MLA: through the absorbed latent attention) and back: the logits of
    the float model, to float rounding; the placeholders see [batch, heads, tokens, dim] tensors."""
    model = float_model(models[family])
    ids = ids_of(model.config.vocab_size)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    recorders = []
    for layer in model.model.layers:
        branches = {b: Recorder() for b in BRANCHES}
        recorders.append(branches)
        install_fa3(layer.self_attn, "mla" if family == "deepseek_v3" else "gqa", branches)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert float((after - before).abs().max()) < 1e-4
    c = model.config
    if family == "deepseek_v3":
        heads = {"fa_q": (c.num_attention_heads, c.kv_lora_rank + c.qk_rope_head_dim),
                 "fa_k": (1, c.kv_lora_rank + c.qk_rope_head_dim), "fa_v": (1, c.kv_lora_rank)}
    else:
        dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        heads = {"fa_q": (c.num_attention_heads, dim), "fa_k": (c.num_key_value_heads, dim),
                 "fa_v": (c.num_key_value_heads, dim)}
    for branch, (h, d) in heads.items():
        assert [tuple(x.shape) for x in recorders[0][branch].seen] == [(1, h, ids.shape[1], d)], branch


def test_mla_quantized_latent_changes_the_logits(models):
    """The absorbed path really attends over the placeholders' output: coarse K scales move the logits."""
    model = float_model(models["deepseek_v3"])
    ids = ids_of(model.config.vocab_size)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    c = model.config
    for layer in model.model.layers:
        coarse = {"fa_q": FA3HeadQuant(torch.full((c.num_attention_heads, 1), 0.05), torch.zeros(c.num_attention_heads, 1)),
                  "fa_k": FA3HeadQuant(torch.full((1, 1), 0.05), torch.zeros(1, 1)),
                  "fa_v": FA3HeadQuant(torch.full((1, 1), 0.05), torch.zeros(1, 1))}
        install_fa3(layer.self_attn, "mla", coarse)
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, before, atol=1e-3)


# ---- calibration: scales are max|x| / 127 per head of the tensors transformers computes ------------------------
def test_dense_scales_are_the_range_of_the_cache_transformers_fills(models, tmp_path):
    """K and V after RoPE are what transformers writes into its DynamicCache: fa_k/fa_v = max|K|,|V| per kv head."""
    from transformers import AutoTokenizer

    calib = small_calib(tmp_path)
    out = tmp_path / "fa3"
    run_quant(models["llama"], out, write_pipeline(tmp_path / "c.yaml", [FA3], dataset=calib))
    saved = saved_tensors(out)
    model, tokenizer = float_model(models["llama"]), AutoTokenizer.from_pretrained(models["llama"])
    maxima = {}
    for text in (json.loads(line)["text"] for line in open(calib)):
        with torch.no_grad():
            cache = model(input_ids=tokenizer(text, return_tensors="pt")["input_ids"], use_cache=True).cache
        for i, layer in enumerate(cache.layers):
            for branch, x in (("fa_k", layer.keys), ("fa_v", layer.values)):
                m = x[0].abs().amax(dim=(1, 2))
                maxima[i, branch] = torch.maximum(maxima.get((i, branch), m), m)
    for (i, branch), m in maxima.items():
        torch.testing.assert_close(saved[f"model.layers.{i}.self_attn.{branch}.scale"], (m / 127).reshape(-1, 1),
                                   rtol=1e-5, atol=1e-7)


def test_mla_k_and_v_scales_are_the_range_of_the_latent_cache(models, tmp_path):
    """MLA's cache holds the latent: transformers writes (c_kv after kv_a_layernorm, k_rot after RoPE); fa_k covers
    [c_kv; k_rot] as one head, fa_v c_kv."""
    from transformers import AutoTokenizer

    calib = small_calib(tmp_path)
    out = tmp_path / "fa3"
    run_quant(models["deepseek_v3"], out, write_pipeline(tmp_path / "c.yaml", [FA3], dataset=calib), "DeepSeek-V3")
    saved = saved_tensors(out)
    model, tokenizer = float_model(models["deepseek_v3"]), AutoTokenizer.from_pretrained(models["deepseek_v3"])
    k_max, v_max = {}, {}
    for text in (json.loads(line)["text"] for line in open(calib)):
        with torch.no_grad():
            cache = model(input_ids=tokenizer(text, return_tensors="pt")["input_ids"], use_cache=True).cache
        for i, layer in enumerate(cache.layers):
            c_kv, k_rot = layer.keys, layer.values
            k = torch.maximum(c_kv.abs().max(), k_rot.abs().max())
            k_max[i] = torch.maximum(k_max.get(i, k), k)
            v_max[i] = torch.maximum(v_max.get(i, c_kv.abs().max()), c_kv.abs().max())
    for i in k_max:
        attn = f"model.layers.{i}.self_attn"
        torch.testing.assert_close(saved[f"{attn}.fa_k.scale"], (k_max[i] / 127).reshape(1, 1), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(saved[f"{attn}.fa_v.scale"], (v_max[i] / 127).reshape(1, 1), rtol=1e-5, atol=1e-7)
        assert saved[f"{attn}.fa_q.scale"].shape == (model.config.num_attention_heads, 1)


# ---- the output, read back by both readers --------------------------------------------------------------------
@pytest.mark.parametrize("family", list(FAMILIES))
def test_round_trip_through_both_readers(models, tmp_path, family):
    out = tmp_path / "fa3"
    process = [W8A8_DYNAMIC, FA3]
    run_quant(models[family], out, write_pipeline(tmp_path / "c.yaml", process, dataset=small_calib(tmp_path)),
              FAMILIES[family])
    description = json.loads((out / "quant_model_description.json").read_text())
    saved = saved_tensors(out)
    layers = float_model(models[family]).config.num_hidden_layers
    assert description["fa_quant_type"] == "FAKQuant"
    for i in range(layers):
        attn = f"model.layers.{i}.self_attn"
        assert description[f"{attn}.quant_type"] == "INT8"
        for branch in BRANCHES:
            assert description[f"{attn}.{branch}.scale"] == description[f"{attn}.{branch}.offset"] == "FAQuant"
            assert saved[f"{attn}.{branch}.scale"].dtype == torch.float32
            assert saved[f"{attn}.{branch}.offset"].dtype == torch.int8 and not saved[f"{attn}.{branch}.offset"].any()
    assert [f for f in check_ascendv1(out) if f.level == "error"] == []

    ours, reference = load_ascendv1(out), load_reference_model(out)
    ids = ids_of(ours.config.vocab_size, tokens=12)
    with torch.no_grad():
        got, expected = ours(input_ids=ids).logits, reference(input_ids=ids).logits
    assert float((got - expected).abs().max()) < 1e-4 * float(expected.abs().max())
    # FA3 is simulated: the same checkpoint without it gives other logits
    for layer in ours.model.layers:
        for branch in BRANCHES:
            setattr(layer.self_attn, branch, nn.Identity())
    with torch.no_grad():
        assert not torch.allclose(ours(input_ids=ids).logits, got, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "deepseek_v3"])
def test_decoding_with_a_cache_reads_what_a_full_forward_reads(models, tmp_path, family):
    """Static per-head scales act token by token: decoding the last token with a real cache (K/V, or MLA's
    latent, read back from it) gives the logits a full forward gives at that position."""
    out = tmp_path / "fa3"
    run_quant(models[family], out, write_pipeline(tmp_path / "c.yaml", [FA3], dataset=small_calib(tmp_path)),
              FAMILIES[family])
    model = load_ascendv1(out)
    ids = ids_of(model.config.vocab_size, tokens=9)
    with torch.no_grad():
        full = model(input_ids=ids).logits[:, -1]
        prefix = model(input_ids=ids[:, :-1], use_cache=True)
        assert prefix.cache is not None and prefix.cache.get_seq_length() == ids.shape[1] - 1
        step = model(input_ids=ids[:, -1:], cache=prefix.cache, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-4)


OTHER_MLA = {"glm4_moe_lite": "GLM-4.7-Flash", "glm_moe_dsa": "GLM-5", "deepseek_v32": "DeepSeek-V3.2",
             "kimi_k2": "Kimi-K2-Instruct-0905"}


@pytest.mark.parametrize("family", list(OTHER_MLA))
def test_the_other_mla_families_round_trip(tmp_path, family):
    """GLM-4.7-Flash, GLM-5 and DeepSeek-V3.2 (sparse-attention indexer) and Kimi-K2: the same latent layout,
    read back alike by both readers. The indexers select every key here (a top-k choice flips under any
    perturbation, so the two readers are compared with all keys)."""
    source = make_tiny_model(tmp_path / "src", family)
    out = tmp_path / "fa3"
    run_quant(source, out, write_pipeline(tmp_path / "c.yaml", [FA3], dataset=small_calib(tmp_path)),
              OTHER_MLA[family])
    saved = saved_tensors(out)
    assert saved["model.layers.0.self_attn.fa_k.scale"].shape == (1, 1)
    assert [f for f in check_ascendv1(out) if f.level == "error"] == []
    ours, reference = load_ascendv1(out), load_reference_model(out)
    for model in (ours, reference):
        for indexer in (m for m in model.modules() if hasattr(m, "index_topk")):
            indexer.index_topk = 1 << 30
    ids = ids_of(ours.config.vocab_size, tokens=12)
    with torch.no_grad():
        got, expected = ours(input_ids=ids).logits, reference(input_ids=ids).logits
    assert float((got - expected).abs().max()) < 1e-4 * float(expected.abs().max())


def test_checker_finds_broken_fa3_keys(models, tmp_path):
    out = tmp_path / "fa3"
    run_quant(models["llama"], out, write_pipeline(tmp_path / "c.yaml", [FA3], dataset=small_calib(tmp_path)))
    path = out / "quant_model_description.json"
    description = json.loads(path.read_text())
    del description["fa_quant_type"]
    description["model.layers.0.self_attn.quant_type"] = "FP8"
    path.write_text(json.dumps(description))
    errors = " | ".join(f.message for f in check_ascendv1(out) if f.level == "error")
    assert "fa_quant_type" in errors and "'FP8'" in errors


# ---- per_token: dynamic, nothing calibrated or saved ---------------------------------------------------------
def test_per_token_writes_the_quant_type_string_only(models, tmp_path):
    """GLM-5.1's `FA3: int8/per_token`: the established tool writes `<attn>.quant_type: INT8_DYNAMIC` and no scales;
    the engine enables FA quant only where scales are saved, so both readers serve float attention."""
    out = tmp_path / "fa3"
    step = {"type": "fa3_quant", "qconfig": {"dtype": "int8", "scope": "per_token", "symmetric": True,
                                             "method": "minmax"}}
    run_quant(models["deepseek_v3"], out, write_pipeline(tmp_path / "c.yaml", [step]), "DeepSeek-V3")
    description = json.loads((out / "quant_model_description.json").read_text())
    assert "fa_quant_type" not in description
    assert not any(".fa_" in k for k in saved_tensors(out))
    assert {k: v for k, v in description.items() if k.endswith(".quant_type")} == {
        f"model.layers.{i}.self_attn.quant_type": "INT8_DYNAMIC" for i in range(3)}
    assert [f for f in check_ascendv1(out) if f.level == "error"] == []
    ids = ids_of(100)
    with torch.no_grad():
        expected = float_model(models["deepseek_v3"])(input_ids=ids).logits
        for model in (load_ascendv1(out), load_reference_model(out)):
            torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


# ---- runners: identical bytes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["qwen3", "deepseek_v3"])
def test_layer_wise_and_model_wise_write_the_same_bytes(models, tmp_path, family):
    layer_wise, model_wise = outputs_of_both_runners(models[family], tmp_path, [W8A8_DYNAMIC, FA3], FAMILIES[family])
    assert layer_wise == model_wise


def _head_rows(rank: int) -> torch.Tensor:
    return torch.randn(1, 3, 2 + 3 * rank, 4, generator=torch.Generator().manual_seed(rank)) * (1 + rank)


def _head_range_worker(collective) -> dict:
    """Ranks 0 and 1 record; rank 2 records nothing and still joins the merge."""
    seen, unseen = HeadRange(), HeadRange()
    if collective.rank < 2:
        seen.update(_head_rows(collective.rank))
    seen.merge(collective, 3)
    unseen.merge(collective, 3)
    return {"min": seen.min, "max": seen.max, "unseen": unseen.seen}


def test_head_ranges_merged_by_ranks_equal_one_process(tmp_path):
    got = spawn_ranks("cpu", (0, 1, 2), tmp_path, _head_range_worker)
    single = HeadRange()
    single.update(_head_rows(0))
    single.update(_head_rows(1))
    assert torch.equal(got["min"], single.min) and torch.equal(got["max"], single.max)
    assert got["unseen"] is False


@pytest.mark.parametrize("family", ["llama", "deepseek_v3"])
def test_dp_layer_wise_merges_to_the_single_process_bytes(models, tmp_path, family):
    path = tmp_path / "varied.jsonl"
    sentence = "Quantization maps floats to integers; apt installs package {i} on Debian. "
    path.write_text("\n".join(json.dumps({"text": sentence.format(i=i) * (1 + i % 4)}) for i in range(8)))
    outs = quantize_variants(models[family], tmp_path, [FA3], FAMILIES[family],
                             {"single": ("auto", DeviceSpec("cpu")), "dp": ("auto", DeviceSpec("cpu", (0, 1)))},
                             str(path))
    single, dp = saved_tensors(outs["single"]), saved_tensors(outs["dp"])
    assert single.keys() == dp.keys() and any(".fa_k.scale" in k for k in single)
    for name in single:
        assert torch.equal(single[name], dp[name]), name
    descriptions = [json.loads((outs[v] / "quant_model_description.json").read_text()) for v in ("single", "dp")]
    assert descriptions[0] == descriptions[1]


# ---- refusals, before any weight is read ----------------------------------------------------------------------
@pytest.fixture
def no_weight_reads(monkeypatch):
    def never(*_a, **_k):
        raise AssertionError("a weight was read before the refusal")

    monkeypatch.setattr("msmodelslim.model.checkpoint.SafetensorsCheckpoint.load", never)


def _parse(step: dict) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config({"apiversion": "modelslim_v1", "spec": {"process": [step]}})
    return str(info.value)


@pytest.mark.parametrize("step, words", [
    ({"type": "fa3_quant", "qconfig": {"dtype": "hifloat8", "scope": "per_token"}}, "'hifloat8' is not implemented yet"),
    ({"type": "fa3_quant", "qconfig": {"dtype": "fp8_e4m3", "scope": "per_head"}}, "static FP8"),
    ({"type": "fa3_quant", "qconfig": {"dtype": "mxfp4", "scope": "dual_scale"}}, "'dual_scale'"),
    ({"type": "fa3_quant", "details": {"fa_q": {"dtype": "mxfp4", "scope": "per_block"}}}, "mixes FA3 scopes"),
    ({"type": "fa3_quant", "qconfig": {"dtype": "int8", "scope": "per_block"}}, "does not go with scope 'per_block'"),
    ({"type": "fa3_quant", "qconfig": {"dtype": "mxfp8", "scope": "per_token"}}, "mxfp8 takes per_block"),
    ({"type": "fa3_quant", "qconfig": {"dtype": "int8", "scope": "per_head", "symmetric": False}}, "scale alone"),
    ({"type": "fa3_quant", "qconfig": {}, "details": {}}, "not both"),
    ({"type": "fa3_quant", "details": {"fa_q": {"scope": "per_token"}}}, "mixes FA3 scopes"),
    ({"type": "fa3_quant", "qconfig": {"scope": "per_channel"}}, "is not one of per_head, per_token"),
])
def test_config_refusals(step, words):
    message = _parse(step)
    assert words in message
    if "not implemented yet" in message:
        assert "floating-point formats" in message


def test_compressed_tensors_is_refused(models, tmp_path, no_weight_reads):
    config = write_pipeline(tmp_path / "c.yaml", [FA3], save="compressed_tensors")
    with pytest.raises(UnsupportedError, match="fa3_quant cannot be saved as compressed_tensors"):
        run_quant(models["llama"], tmp_path / "out", config)


def test_a_transform_after_fa3_is_refused():
    message = _parse_spec([FA3, {"type": "iter_smooth"}])
    assert "float transforms (smoothing, rotation) must come before quantization" in message


def _parse_spec(process: list[dict]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config({"apiversion": "modelslim_v1", "spec": {"process": process}})
    return str(info.value)
