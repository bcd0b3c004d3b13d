"""QuaRot on mixture-of-experts and multi-head latent attention models (Qwen3-MoE, DeepSeek-V3): the rotated
float model gives the same logits (routers, routed and shared experts, dense and sparse layers, the MLA value
heads through kv_b_proj), both runners and two data-parallel ranks write the same bytes, quarot then W8A8
dynamic passes the format check and reads back close to float, and the multi-token-prediction layer rotated
from its tensors predicts what it predicted before."""
import json
from dataclasses import replace

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    DeepseekV3Attention,
    DeepseekV3DecoderLayer,
    DeepseekV3RMSNorm,
    DeepseekV3RotaryEmbedding,
)

from helpers import SCHEMES, outputs_of_both_runners, quantize_variants, run_quant, shard_bytes
from msmodelslim.cli.__main__ import main
from msmodelslim.core.device import DeviceSpec
from msmodelslim.core.errors import ProcessingError, UnsupportedError
from msmodelslim.format.ascendv1.reader import load_ascendv1
from msmodelslim.model.interface import MlaShape, ModelStructure
from msmodelslim.model.moe import unfuse_experts
from msmodelslim.model.registry import create_adapter
from msmodelslim.model.rotation import DEEPSEEK_V3_ROTATION, LLAMA_ROTATION, QWEN3_MOE_ROTATION, gated_mlp
from msmodelslim.processor.base import ProcessorContext
from msmodelslim.processor.quarot.config import QuaRotConfig
from msmodelslim.processor.quarot.hadamard import random_rotation
from msmodelslim.processor.quarot.mtp import rotate_mtp_layer
from msmodelslim.processor.quarot.processor import QuaRotProcessor
from msmodelslim.processor.quarot.rotate import ValueHeads, rotate_value_heads
from reference_reader import load_reference_model
from tiny_models import make_tiny_model, tiny_config

FAMILIES = ("qwen3_moe", "deepseek_v3")
MODEL_TYPE = {"qwen3_moe": "Qwen3-30B-A3B", "deepseek_v3": "DeepSeek-V3"}
MOE_LAYER = {"qwen3_moe": 1, "deepseek_v3": 2}
W8A8_DYNAMIC = {"type": "linear_quant", "qconfig": SCHEMES["w8a8_dynamic"], "exclude": ["lm_head"]}


def randomize_gains(source):
    """Norm weights away from 1 (they would hide a missing fold), a router with decisive logits, and a
    non-zero DeepSeek routing correction bias (added after the router's matmul)."""
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if "norm" in name:
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=g))
            elif name.endswith("mlp.gate.weight"):
                tensor.normal_(0, 0.3, generator=g)
            elif name.endswith("e_score_correction_bias"):
                tensor.copy_(0.1 * torch.rand(tensor.shape, generator=g))
    model.save_pretrained(source)
    return model.eval()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """{family: (checkpoint path, its float model)}."""
    out = {}
    for family in FAMILIES:
        path = make_tiny_model(tmp_path_factory.mktemp(family), family, seed=5)
        out[family] = (path, randomize_gains(path))
    return out


def write(path, process, runner="layer_wise"):
    path.write_text(yaml.safe_dump({"apiversion": "modelslim_v1", "spec": {"runner": runner, "process": process}}))
    return path


def ids_for(model, seed=1):
    return torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


# ---- the structure ---------------------------------------------------------------------------------------------
def test_builders_describe_the_families():
    assert LLAMA_ROTATION.norm_readers == (
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")))
    assert LLAMA_ROTATION.writers == ("self_attn.o_proj", "mlp.down_proj")
    assert [(h.value, h.output, h.layout) for h in LLAMA_ROTATION.heads] == [
        ("self_attn.v_proj", "self_attn.o_proj", "gqa")]
    mlp_readers = dict(DEEPSEEK_V3_ROTATION.norm_readers)["post_attention_layernorm"]
    assert {"mlp.gate", "mlp.experts.*.gate_proj", "mlp.experts.*.up_proj", "mlp.shared_experts.gate_proj",
            "mlp.gate_proj"} <= set(mlp_readers)
    writers = set(DEEPSEEK_V3_ROTATION.writers)
    assert {"mlp.experts.*.down_proj", "mlp.shared_experts.down_proj", "mlp.down_proj", "self_attn.o_proj"} <= writers
    assert [h.layout for h in DEEPSEEK_V3_ROTATION.heads] == ["mla"]
    assert gated_mlp("mlp.shared_expert", extra_readers=("shared_expert_gate",)).readers == (
        "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.shared_expert_gate")


def test_a_module_the_structure_forgets_is_refused_before_any_weight_is_read(sources):
    """Without the router in the structure, rotating would silently change the routing."""
    path, _ = sources["qwen3_moe"]
    adapter = create_adapter(MODEL_TYPE["qwen3_moe"], str(path), False)
    skeleton = adapter.init_skeleton()
    assert skeleton.model.embed_tokens.weight.device.type == "meta"
    readers = tuple((norm, tuple(r for r in names if r != "mlp.gate"))
                    for norm, names in QWEN3_MOE_ROTATION.norm_readers)
    structure = ModelStructure(rotation=replace(QWEN3_MOE_ROTATION, norm_readers=readers))
    processor = QuaRotProcessor(QuaRotConfig(type="quarot"),
                                ProcessorContext("Forgetful", structure, adapter.attention_shape()))
    with pytest.raises(UnsupportedError, match=r"model\.layers\.0\.mlp\.gate \(Qwen3MoeTopKRouter\) reads the hidden "
                                               r"size 64 but adapter Forgetful's RotationStructure lists it neither"):
        processor.check_model(skeleton, adapter.block_names(skeleton))
    QuaRotProcessor(QuaRotConfig(type="quarot"), ProcessorContext("Q", adapter.structure, adapter.attention_shape())
                    ).check_model(skeleton, adapter.block_names(skeleton))


def test_mla_head_rotation_needs_the_mla_shape():
    with pytest.raises(UnsupportedError, match="describes a multi-head latent attention head rotation but gives no "
                                               r"MLA shape \(mla_shape\(\)\)"):
        QuaRotProcessor(QuaRotConfig(type="quarot"),
                        ProcessorContext("D", ModelStructure(rotation=DEEPSEEK_V3_ROTATION)))


def test_mla_value_heads_rotate_exactly_through_kv_b_proj():
    """The V rows of kv_b_proj (per head after qk_nope_head_dim K rows) against o_proj's columns, in float64."""
    config = tiny_config("deepseek_v3", 320)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    attention = DeepseekV3Attention(config, 0).double().eval()
    with torch.no_grad():
        for p in attention.parameters():
            p.normal_(0, 0.3) if p.dim() == 2 else p.uniform_(0.5, 1.5)
    x = torch.randn(2, 10, 64, dtype=torch.float64)
    cos, sin = DeepseekV3RotaryEmbedding(config)(x, torch.arange(10)[None])
    mask = torch.full((10, 10), float("-inf"), dtype=torch.float64).triu(1)[None, None]
    run = lambda: attention(x, position_embeddings=(cos, sin), attention_mask=mask)[0]  # noqa: E731
    with torch.no_grad():
        before, kv_b = run(), attention.kv_b_proj.weight.clone()
        h = random_rotation(16, seed=7)[0]
        rotate_value_heads(attention.kv_b_proj.weight, None, attention.o_proj.weight, h,
                           ValueHeads.mla(MlaShape(num_heads=4, qk_nope_head_dim=8, v_head_dim=16)))
        after = run()
    per_head = attention.kv_b_proj.weight.view(4, 24, 16)
    assert torch.equal(per_head[:, :8], kv_b.view(4, 24, 16)[:, :8])  # key rows untouched
    assert not torch.allclose(per_head[:, 8:], kv_b.view(4, 24, 16)[:, 8:])
    assert (after - before).abs().max() < 1e-12


# ---- the float model is unchanged --------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_rotation_alone_leaves_the_float_model_unchanged(sources, tmp_path, family, capsys):
    path, model = sources[family]
    out = tmp_path / "out"
    run_quant(path, out, write(tmp_path / "c.yaml", [{"type": "quarot", "seed": 3}]), MODEL_TYPE[family])
    rotated = load_ascendv1(out)
    ids = ids_for(model)
    delta = (logits(model, ids) - logits(rotated, ids)).abs().max().item()
    with capsys.disabled():
        print(f"\n{family}: max |Δlogit| rotated vs float = {delta:.2e}")
    assert delta < 1e-4
    q = load_file(out / "optional" / "quarot.safetensors")["global_rotation"]
    layer = MOE_LAYER[family]
    original, ours = model.model.layers[layer], rotated.model.layers[layer]
    g = original.post_attention_layernorm.weight
    router = original.mlp.gate.weight
    torch.testing.assert_close(ours.mlp.gate.weight, (router * g) @ q, atol=1e-5, rtol=1e-5)
    inter = original.mlp.experts.down_proj.shape[-1]
    gate_0 = original.mlp.experts.gate_up_proj[0, :inter]
    torch.testing.assert_close(ours.mlp.experts[0].gate_proj.weight, (gate_0 * g) @ q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.mlp.experts[3].down_proj.weight, q.T @ original.mlp.experts.down_proj[3],
                               atol=1e-5, rtol=1e-5)
    assert torch.equal(ours.post_attention_layernorm.weight, torch.ones_like(g))
    if family == "deepseek_v3":
        torch.testing.assert_close(ours.mlp.shared_experts.down_proj.weight,
                                   q.T @ original.mlp.shared_experts.down_proj.weight, atol=1e-5, rtol=1e-5)
        bias = original.mlp.gate.e_score_correction_bias
        assert bias.abs().min() > 0 and torch.equal(ours.mlp.gate.e_score_correction_bias, bias)
        dense = rotated.model.layers[0].mlp  # the dense first layer: the llama MLP
        torch.testing.assert_close(dense.down_proj.weight, q.T @ model.model.layers[0].mlp.down_proj.weight,
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_wise_equals_model_wise(sources, tmp_path, family):
    layer_wise, model_wise = outputs_of_both_runners(sources[family][0], tmp_path, [{"type": "quarot"}, W8A8_DYNAMIC],
                                                     MODEL_TYPE[family])
    assert "optional/quarot.safetensors" in layer_wise
    assert layer_wise == model_wise


def test_two_data_parallel_ranks_write_the_single_process_bytes(sources, tmp_path, log_lines):
    cpu = DeviceSpec("cpu")
    outs = quantize_variants(sources["deepseek_v3"][0], tmp_path, [{"type": "quarot"}, W8A8_DYNAMIC],
                             MODEL_TYPE["deepseek_v3"], {"single": ("layer_wise", cpu),
                                                         "dp": ("dp_layer_wise", DeviceSpec("cpu", (0, 1)))})
    assert any(line.startswith("runner dp_layer_wise") and "x 2 ranks" in line for line in log_lines), log_lines
    single, dp = shard_bytes(outs["single"]), shard_bytes(outs["dp"])
    assert "optional/quarot.safetensors" in single
    assert single == dp


# ---- quarot then W8A8 dynamic ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_quarot_then_w8a8_dynamic_checks_and_reads_back_close_to_float(sources, tmp_path, family, capsys):
    path, model = sources[family]
    out = tmp_path / "out"
    run_quant(path, out, write(tmp_path / "c.yaml", [{"type": "quarot"}, W8A8_DYNAMIC]), MODEL_TYPE[family])
    assert main(["check", str(out)]) == 0
    description = json.loads((out / "quant_model_description.json").read_text())
    layer = MOE_LAYER[family]
    assert description[f"model.layers.{layer}.mlp.experts.0.down_proj.weight"] == "W8A8_DYNAMIC"
    assert description[f"model.layers.{layer}.mlp.gate.weight"] == "FLOAT"
    ids = ids_for(model, seed=2)
    expected = logits(model, ids)
    ours = logits(load_ascendv1(out), ids)
    torch.testing.assert_close(ours, logits(load_reference_model(out), ids), atol=1e-4, rtol=1e-4)
    drift = ((ours - expected).norm() / expected.norm()).item()
    with capsys.disabled():
        print(f"\n{family}: quarot + W8A8 dynamic, relative logit error vs float {drift:.4f}")
    assert drift < 0.05, f"quarot + W8A8 dynamic drifted {drift:.3f} from float"


# ---- the multi-token-prediction layer ----------------------------------------------------------------------------
class Mtp(nn.Module):
    """DeepSeek-V3's MTP layer built by hand around transformers' decoder layer, with the checkpoint's names
    (`model.layers.<n>.{enorm, hnorm, eh_proj, shared_head.*, embed_tokens}` next to the decoder's own)."""

    def __init__(self, config, index: int) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.layer = DeepseekV3DecoderLayer(config, index)
        unfuse_experts(self.layer)  # per-expert names, as on disk
        self.layer.embed_tokens = nn.Embedding(config.vocab_size, h)
        self.layer.enorm, self.layer.hnorm = DeepseekV3RMSNorm(h, eps), DeepseekV3RMSNorm(h, eps)
        self.layer.eh_proj = nn.Linear(2 * h, h, bias=False)
        self.layer.shared_head = nn.Module()
        self.layer.shared_head.norm = DeepseekV3RMSNorm(h, eps)
        self.layer.shared_head.head = nn.Linear(h, config.vocab_size, bias=False)
        self.rotary = DeepseekV3RotaryEmbedding(config)

    def forward(self, next_ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        m = self.layer
        x = m.eh_proj(torch.cat([m.enorm(m.embed_tokens(next_ids)), m.hnorm(hidden)], dim=-1))
        positions = torch.arange(x.shape[1])[None]
        x = m(x, attention_mask=None, position_embeddings=self.rotary(x, positions))  # sdpa: causal
        return m.shared_head.head(m.shared_head.norm(x))


def hidden_states(model, ids):
    """The main model's last hidden state before (pre) and after (post) its final norm."""
    seen = {}
    hook = model.model.norm.register_forward_hook(lambda _m, args, out: seen.update(pre=args[0], post=out))
    with torch.no_grad():
        model(input_ids=ids)
    hook.remove()
    return seen["pre"], seen["post"]


def test_mtp_layer_rotated_from_its_tensors_predicts_what_it_predicted(sources, capsys):
    path, _ = sources["deepseek_v3"]
    adapter = create_adapter(MODEL_TYPE["deepseek_v3"], str(path), False)
    model = adapter.init_model(torch.device("cpu"), load_layers=True)
    config = model.config
    index = config.num_hidden_layers
    prefix = f"model.layers.{index}."
    torch.manual_seed(11)
    mtp = Mtp(config, index).eval()
    with torch.no_grad():
        for name, p in mtp.named_parameters():
            p.copy_(0.5 + torch.rand(p.shape)) if p.dim() == 1 else p.normal_(0, 0.08)
    tensors = {prefix + n: t for n, t in mtp.layer.state_dict().items()}
    ids = ids_for(model, seed=3)
    pre, post = hidden_states(model, ids)
    with torch.no_grad():
        expected = mtp(ids[:, 1:], pre[:, :-1])
        expected_post = mtp(ids[:, 1:], post[:, :-1])
        final_gain = model.model.norm.weight.clone()

    processor = QuaRotProcessor(QuaRotConfig(type="quarot", seed=4), ProcessorContext(
        "DeepseekV3Adapter", adapter.structure, adapter.attention_shape(), adapter.mla_shape()))
    processor.check_model(model, adapter.block_names(model))
    processor.prepare_model(model)
    for name in adapter.block_names(model):
        processor.after_forward(name, model.get_submodule(name))
    rotated_tensors = processor.rotate_mtp(tensors, prefix)
    assert rotated_tensors.keys() == tensors.keys()
    assert torch.equal(tensors[prefix + "enorm.weight"], mtp.layer.enorm.weight)  # the input is left alone
    pre_r, post_r = hidden_states(model, ids)

    def mtp_logits(weights, hidden):
        rotated = Mtp(config, index).eval()
        rotated.layer.load_state_dict({n[len(prefix):]: t for n, t in weights.items()})
        with torch.no_grad():
            return rotated(ids[:, 1:], hidden[:, :-1])

    delta = (mtp_logits(rotated_tensors, pre_r) - expected).abs().max().item()
    with capsys.disabled():
        print(f"\nMTP (pre-final-norm hidden state): max |Δlogit| rotated vs float = {delta:.2e}")
    assert delta < 1e-4
    assert not torch.allclose(rotated_tensors[prefix + "eh_proj.weight"], tensors[prefix + "eh_proj.weight"])

    # an engine feeding the post-final-norm state: exact when the final gain is uniform, approximate otherwise
    structure, heads = adapter.structure.rotation, processor._head_rotations()
    post_fed = processor.rotate_mtp(tensors, prefix, post_norm_hidden=True)
    assert torch.equal(processor.final_gain, final_gain)
    unaware = (mtp_logits(rotated_tensors, post_r) - expected_post).abs().max().item()
    aware = (mtp_logits(post_fed, post_r) - expected_post).abs().max().item()
    with capsys.disabled():
        print(f"MTP fed the post-final-norm state, final gain in [0.5, 1.5): max |Δlogit| {aware:.2e} with "
              f"final_norm_weight, {unaware:.2e} without (logits up to {expected_post.abs().max():.2f})")
    assert aware < unaware
    uniform = torch.full_like(final_gain, 1.7)
    with torch.no_grad():  # the original model with a uniform final gain would have fed n(h)·1.7
        expected_uniform = mtp(ids[:, 1:], post[:, :-1] / final_gain * uniform)
    uniform_fed = rotate_mtp_layer(tensors, prefix, structure, processor.q, heads, final_norm_weight=uniform)
    assert (mtp_logits(uniform_fed, post_r) - expected_uniform).abs().max() < 1e-4


def test_quantized_mtp_tensors_are_refused():
    q = torch.eye(4)
    tensors = {"model.layers.3.eh_proj.weight": torch.zeros(4, 8),
               "model.layers.3.eh_proj.weight_scale_inv": torch.ones(1, 1)}
    with pytest.raises(ProcessingError, match="weight_scale_inv is quantized; dequantize the MTP layer"):
        rotate_mtp_layer(tensors, "model.layers.3.", DEEPSEEK_V3_ROTATION, q, {})
    stacked = {"model.layers.3.mlp.experts.gate_up_proj": torch.zeros(2, 8, 4)}
    with pytest.raises(ProcessingError, match=r"gate_up_proj is \[2, 8, 4\]: experts stacked"):
        rotate_mtp_layer(stacked, "model.layers.3.", DEEPSEEK_V3_ROTATION, q, {})
    with pytest.raises(ProcessingError, match="describes no multi-token-prediction layer"):
        rotate_mtp_layer({}, "model.layers.3.", LLAMA_ROTATION, q, {})


def test_the_rotation_example_in_the_docs_builds_the_shipped_structure():
    from pathlib import Path
    import re

    text = (Path(__file__).resolve().parents[1] / "docs" / "adding_a_model.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "decoder_rotation(" in b]
    namespace: dict = {}
    exec(compile(block, "docs/adding_a_model.md", "exec"), namespace)
    assert namespace["MLA_ROTATION"] == DEEPSEEK_V3_ROTATION
    assert set(QWEN3_MOE_ROTATION.readers) < set(namespace["MOE_ROTATION"].readers)
