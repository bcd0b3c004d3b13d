"""MoE adapters (Qwen3-MoE, DeepSeek-V3): unfused experts compute what the fused module computes, checkpoints load
(per-expert and stacked), W8A8/W4A8 dynamic round-trip through both readers, both runners write the same bytes,
experts without tokens still quantize, and static activations on experts are refused."""
import json
import shutil

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import msmodelslim.app.quantize as quantize_app
from helpers import SCHEMES, outputs_of_both_runners, run_quant, small_calib
from msmodelslim.cli.__main__ import main
from msmodelslim.core.errors import ConfigError, InvalidModelError
from msmodelslim.format.ascendv1.checker import check_moe_experts
from msmodelslim.format.ascendv1.reader import load_ascendv1
from msmodelslim.model.moe import UnfusedExperts, UnfusedExpertsSkippingZeroWeights, unfuse_experts
from msmodelslim.model.registry import create_adapter
from msmodelslim.quantizer.primitives import quantize_weight_minmax
from reference_reader import load_reference_model
from tiny_models import tiny_config

FAMILIES = ("qwen3_moe", "deepseek_v3")
MODEL_TYPE = {"qwen3_moe": "Qwen3-30B-A3B", "deepseek_v3": "DeepSeek-V3"}
MOE_LAYERS = {"qwen3_moe": [0, 1], "deepseek_v3": [1, 2]}
EXPERTS = "*.mlp.experts.*"
NUM_EXPERTS = 4


@pytest.fixture(scope="module")
def moe_models(tiny_qwen3_moe, tiny_deepseek_v3):
    return {"qwen3_moe": tiny_qwen3_moe, "deepseek_v3": tiny_deepseek_v3}


def rule(scheme: str, include=("*",), exclude=()) -> dict:
    return {"type": "linear_quant", "qconfig": SCHEMES[scheme], "include": list(include), "exclude": list(exclude)}


def experts_and_rest(experts: str, rest: str) -> list[dict]:
    """Routed experts with one scheme, every other linear but lm_head with another."""
    return [rule(experts, include=[EXPERTS]), rule(rest, exclude=["lm_head", EXPERTS])]


def write_process(path, process: list[dict], runner: str = "layer_wise", dataset: str | None = None):
    spec = {"runner": runner, "process": process}
    if dataset:
        spec["dataset"] = dataset
    path.write_text(yaml.safe_dump({"apiversion": "modelslim_v1", "spec": spec}))
    return path


def quantize_keeping_model(monkeypatch, source, out, config, model_type):
    """Run quantize (model_wise) and keep the in-memory fake-quantized model it produced."""
    kept = {}
    run_blocks = quantize_app.run_blocks

    def keep(adapter, model, *args, **kwargs):
        kept["model"] = model
        return run_blocks(adapter, model, *args, **kwargs)

    monkeypatch.setattr(quantize_app, "run_blocks", keep)
    report = run_quant(source, out, config, model_type)
    return report, kept["model"]


def random_ids(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(seed))


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def read_tensors(path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def expert_weights(fused, e: int) -> dict[str, torch.Tensor]:
    """Expert e's float weights from a fused transformers experts module (gate rows first, then up rows)."""
    inter = fused.down_proj.shape[-1]
    return {"gate_proj": fused.gate_up_proj[e, :inter].detach(), "up_proj": fused.gate_up_proj[e, inter:].detach(),
            "down_proj": fused.down_proj[e].detach()}


# ---- (a) the unfused module ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("implementation", ["eager", "grouped_mm"])
def test_unfused_experts_compute_what_the_fused_module_computes(family, implementation):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family, 320), dtype=torch.float32,
                                             experts_implementation=implementation)
    fused = model.model.layers[MOE_LAYERS[family][0]].mlp.experts
    with torch.no_grad():
        fused.gate_up_proj.normal_(0, 0.1)
        fused.down_proj.normal_(0, 0.1)
    hidden = torch.randn(40, 64)
    # expert 2 is never picked; each token picks two different experts
    choices = torch.tensor([[0, 1], [1, 3], [3, 0], [1, 0]])
    top_k_index = choices[torch.randint(0, len(choices), (40,))]
    top_k_weights = torch.rand(40, 2)
    unfused = UnfusedExperts.from_fused(fused)
    seen = {e: [] for e in range(NUM_EXPERTS)}
    for e, expert in enumerate(unfused):
        expert.gate_proj.register_forward_pre_hook(lambda _m, args, e=e: seen[e].append(args[0]))
    with torch.no_grad():
        expected = fused(hidden, top_k_index, top_k_weights)
        got = unfused(hidden, top_k_index, top_k_weights)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    for e in range(NUM_EXPERTS):
        rows = torch.cat(seen[e]) if seen[e] else hidden[:0]
        tokens = (rows[:, None, :] == hidden[None]).all(dim=-1).nonzero()[:, 1]  # which token each row is
        expected_tokens = (top_k_index == e).any(dim=1).nonzero().flatten()
        assert sorted(tokens.tolist()) == expected_tokens.tolist(), f"expert {e} must see exactly its routed tokens"
    assert seen[2] == []


def test_unfused_experts_skip_the_padding_index():
    fused_model = AutoModelForCausalLM.from_config(tiny_config("qwen3_moe", 320), experts_implementation="eager")
    fused = fused_model.model.layers[0].mlp.experts
    with torch.no_grad():
        fused.gate_up_proj.normal_(0, 0.1)
        fused.down_proj.normal_(0, 0.1)
    hidden, weights = torch.randn(3, 64), torch.rand(3, 2)
    index = torch.tensor([[0, NUM_EXPERTS], [1, 2], [NUM_EXPERTS, 3]])  # NUM_EXPERTS = "no expert"
    with torch.no_grad():
        got, expected = UnfusedExperts.from_fused(fused)(hidden, index, weights), fused(hidden, index, weights)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_zero_weight_picks_are_not_forwarded_and_change_nothing():
    """LongCat-Flash under transformers >= 5.25 hands its zero-computation experts' picks to routed experts with
    weight 0: the output is the plain unfused experts' (those picks add nothing), and the picked experts never
    see those tokens (calibration statistics of real routing only)."""
    fused_model = AutoModelForCausalLM.from_config(tiny_config("qwen3_moe", 320), experts_implementation="eager")
    fused = fused_model.model.layers[0].mlp.experts
    with torch.no_grad():
        fused.gate_up_proj.normal_(0, 0.1)
        fused.down_proj.normal_(0, 0.1)
    hidden = torch.randn(4, 64)
    index = torch.tensor([[0, 1], [1, 2], [3, 0], [2, 3]])
    weights = torch.tensor([[0.6, 0.4], [0.0, 0.7], [0.5, 0.0], [0.3, 0.2]])  # two dummy picks: token 1, token 2
    skipping = UnfusedExpertsSkippingZeroWeights.from_fused(fused)
    seen = {e: [] for e in range(len(skipping))}
    for e, expert in enumerate(skipping):
        expert.projection("gate").register_forward_pre_hook(lambda _m, args, e=e: seen[e].append(args[0].shape[0]))
    with torch.no_grad():
        got, plain = skipping(hidden, index, weights), UnfusedExperts.from_fused(fused)(hidden, index, weights)
    torch.testing.assert_close(got, plain, atol=1e-6, rtol=1e-6)
    real = {e: int(((index == e) & (weights > 0)).any(dim=1).sum()) for e in range(len(skipping))}
    assert {e: sum(n) for e, n in seen.items()} == real  # expert 1 sees token 0 only, expert 0 token 0 only
    assert real[1] == 1 and real[0] == 1


def test_unfuse_experts_renames_to_the_checkpoint_names():
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config("deepseek_v3", 320))
    assert unfuse_experts(model) == 2
    names = set(model.state_dict())
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in names
    assert "model.layers.2.mlp.shared_experts.up_proj.weight" in names
    assert not any(n.endswith(("gate_up_proj", "experts.down_proj")) for n in names)
    assert unfuse_experts(model) == 0


# ---- (b) loading through the adapter ------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_loads_the_float_model_and_walks_it_block_by_block(moe_models, family):
    source = moe_models[family]
    adapter = create_adapter(MODEL_TYPE[family], str(source), False)
    model = adapter.init_model(torch.device("cpu"), load_layers=True)
    hf = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    ids = random_ids(hf.config.vocab_size)
    expected = logits(hf, ids)
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-5, rtol=1e-5)
    # the calibration path: the blocks run one by one from the captured first-block inputs
    generator = adapter.generate_model_forward(model, {"input_ids": ids})
    request = next(generator)
    with torch.no_grad():
        while True:
            hidden = request.module(*request.args, **request.kwargs)
            try:
                request = generator.send(hidden)
            except StopIteration:
                break
        torch.testing.assert_close(model.lm_head(model.model.norm(hidden)), expected, atol=1e-5, rtol=1e-5)


# ---- (c) W8A8 and W4A8 round trips ---------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scheme", ["w8a8", "w4a8"])
def test_dynamic_schemes_round_trip(moe_models, tmp_path, monkeypatch, family, scheme):
    source = moe_models[family]
    experts_scheme = {"w8a8": "w8a8_dynamic", "w4a8": "w4a8_dynamic"}[scheme]
    config = write_process(tmp_path / "c.yaml", experts_and_rest(experts_scheme, "w8a8_dynamic"), runner="model_wise")
    out = tmp_path / "out"
    report, in_memory = quantize_keeping_model(monkeypatch, source, out, config, MODEL_TYPE[family])
    assert report.warnings == [], "experts are MoE layers: no dense-W4A8 warning"
    description = json.loads((out / "quant_model_description.json").read_text())
    tensors = read_tensors(out)
    tag = {"w8a8": "W8A8_DYNAMIC", "w4a8": "W4A8_DYNAMIC"}[scheme]
    bits = {"w8a8": 8, "w4a8": 4}[scheme]

    original = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    ours = load_ascendv1(out)
    for layer in MOE_LAYERS[family]:
        assert description[f"model.layers.{layer}.mlp.gate.weight"] == "FLOAT"  # the router
        fused = original.model.layers[layer].mlp.experts
        for e in range(NUM_EXPERTS):
            for proj, w in expert_weights(fused, e).items():
                name = f"model.layers.{layer}.mlp.experts.{e}.{proj}"
                assert description[f"{name}.weight"] == tag
                q, _, _ = quantize_weight_minmax(w, bits, True, None)
                assert torch.equal(ours.get_submodule(name).qweight, q), f"{name}: codes differ from round to nearest"
        if scheme == "w4a8":
            first = f"model.layers.{layer}.mlp.experts.0"
            gate, down = tensors[f"{first}.gate_proj.scale_bias"], tensors[f"{first}.down_proj.scale_bias"]
            assert gate.shape == (32, 1) and down.shape == (64, 16)  # column role [N,1], row role [N,16]
            assert tensors[f"{first}.gate_proj.weight"].shape == (16, 64)
    dense = (["self_attn.q_proj", "self_attn.o_proj"] if family == "qwen3_moe" else
             ["self_attn.q_a_proj", "self_attn.q_b_proj", "self_attn.kv_a_proj_with_mqa", "self_attn.kv_b_proj",
              "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"])
    for name in dense:
        assert description[f"model.layers.0.{name}.weight"] == "W8A8_DYNAMIC"
    if family == "deepseek_v3":
        assert description["model.layers.1.mlp.shared_experts.gate_proj.weight"] == "W8A8_DYNAMIC"
        assert description["model.layers.1.mlp.gate.e_score_correction_bias"] == "FLOAT"

    ids = random_ids(original.config.vocab_size)
    our_logits = logits(ours, ids)
    torch.testing.assert_close(our_logits, logits(in_memory, ids), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(our_logits, logits(load_reference_model(out), ids), atol=1e-4, rtol=1e-4)
    float_logits = logits(original, ids)
    drift = (our_logits - float_logits).norm() / float_logits.norm()
    # Looser than dense models: a perturbed hidden state can flip a token's top-2 experts near a tie.
    assert drift < (0.15 if scheme == "w8a8" else 0.3), f"quantized model drifted {drift:.3f} from float"


# ---- (d) both runners, with static attention calibrated through the MoE blocks --------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_layer_wise_equals_model_wise_with_static_attention(moe_models, tmp_path, family):
    process = [rule("w8a8_static", include=["*self_attn*"]),
               rule("w8a8_dynamic", exclude=["lm_head", "*self_attn*", EXPERTS]),
               rule("w4a8_dynamic", include=[EXPERTS])]
    layer_wise, model_wise = outputs_of_both_runners(moe_models[family], tmp_path, process, MODEL_TYPE[family])
    assert layer_wise and layer_wise == model_wise
    description = json.loads((tmp_path / "layer_wise" / "quant_model_description.json").read_text())
    attention = "q_proj" if family == "qwen3_moe" else "q_a_proj"
    assert description[f"model.layers.1.self_attn.{attention}.weight"] == "W8A8"
    ids = random_ids(320)
    torch.testing.assert_close(logits(load_ascendv1(tmp_path / "layer_wise"), ids),
                               logits(load_reference_model(tmp_path / "layer_wise"), ids), atol=1e-4, rtol=1e-4)


# ---- (e) experts that receive no tokens ----------------------------------------------------------------------
def starve_expert(source, dest, layer: int, expert: int):
    """A copy of the DeepSeek checkpoint whose router never picks `expert` in `layer` (correction bias -1e4)."""
    shutil.copytree(source, dest)
    (weights,) = dest.glob("*.safetensors")
    state = load_file(weights)
    state[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"][expert] = -1e4
    save_file(state, weights, metadata={"format": "pt"})
    return dest


def test_expert_without_tokens_falls_back_from_gptq_to_minmax(tiny_deepseek_v3, tmp_path, log_lines):
    source = starve_expert(tiny_deepseek_v3, tmp_path / "starved", layer=1, expert=2)
    gptq = {**SCHEMES["w8a8_dynamic"], "weight": {**SCHEMES["w8a8_dynamic"]["weight"], "method": "gptq"}}
    process = [{"type": "linear_quant", "qconfig": gptq, "include": [EXPERTS]},
               rule("w8a8_dynamic", exclude=["lm_head", EXPERTS])]
    out = tmp_path / "out"
    run_quant(source, out, write_process(tmp_path / "c.yaml", process, dataset=small_calib(tmp_path)), "DeepSeek-V3")
    assert any(line.startswith("model.layers.1.mlp.experts.2 received no calibration tokens") and "gptq" in line
               for line in log_lines), log_lines
    assert "model.layers.1.mlp.experts: 1 of 4 experts received no calibration tokens" in log_lines
    assert "model.layers.2.mlp.experts: 0 of 4 experts received no calibration tokens" in log_lines

    description = json.loads((out / "quant_model_description.json").read_text())
    original = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    ours = load_ascendv1(out)
    fused = original.model.layers[1].mlp.experts
    for e in (0, 2):
        for proj, w in expert_weights(fused, e).items():
            name = f"model.layers.1.mlp.experts.{e}.{proj}"
            assert description[f"{name}.weight"] == "W8A8_DYNAMIC"
            same_as_rtn = torch.equal(ours.get_submodule(name).qweight, quantize_weight_minmax(w, 8, True, None)[0])
            assert same_as_rtn == (e == 2), f"{name}: only the starved expert uses minmax rounding"


# ---- (f) static activations on experts ----------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_static_activations_on_experts_are_refused_before_any_work(moe_models, tmp_path, family):
    out = tmp_path / "out"
    config = write_process(tmp_path / "c.yaml", [rule("w8a8_static", exclude=["lm_head"])],
                           dataset=small_calib(tmp_path))
    with pytest.raises(ConfigError, match=r"static activation quantization \(W8A8\) to 24 routed expert linears.*"
                                          r"pattern 'model\.layers\.\d\.mlp\.experts\.\*'.*per_token") as error:
        run_quant(moe_models[family], out, config, MODEL_TYPE[family])
    assert "no serving kernel runs static-activation MoE" in str(error.value)
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


# Smoothing on these families: tests/test_moe_smoothing.py; rotation: tests/test_quarot_moe.py.


# ---- (g) stacked checkpoints -------------------------------------------------------------------------------
def write_stacked(source, dest, transpose: bool = False):
    """The checkpoint with transformers' in-memory names: experts stacked as gate_up_proj / down_proj."""
    dest.mkdir()
    for path in source.iterdir():
        if path.suffix == ".json" and not path.name.endswith("index.json"):
            shutil.copy(path, dest / path.name)
    state = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).state_dict()
    state = {k: (v.transpose(1, 2) if transpose and k.endswith("experts.down_proj") else v).contiguous()
             for k, v in state.items()}
    assert "model.layers.1.mlp.experts.gate_up_proj" in state
    save_file(state, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


@pytest.mark.parametrize("family", FAMILIES)
def test_stacked_expert_checkpoint_loads_and_quantizes_identically(moe_models, tmp_path, family):
    source = moe_models[family]
    stacked = write_stacked(source, tmp_path / "stacked")
    with safe_open(stacked / "model.safetensors", "pt") as f:
        assert not any(".experts.0." in k for k in f.keys())
    model = create_adapter(MODEL_TYPE[family], str(stacked), False).init_model(torch.device("cpu"), load_layers=True)
    hf = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    ids = random_ids(hf.config.vocab_size)
    torch.testing.assert_close(logits(model, ids), logits(hf, ids), atol=1e-5, rtol=1e-5)
    config = write_process(tmp_path / "c.yaml", experts_and_rest("w4a8_dynamic", "w8a8_dynamic"))
    run_quant(source, tmp_path / "from_experts", config, MODEL_TYPE[family])
    run_quant(stacked, tmp_path / "from_stacked", config, MODEL_TYPE[family])
    a, b = read_tensors(tmp_path / "from_experts"), read_tensors(tmp_path / "from_stacked")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stacked_tensor_of_the_wrong_layout_is_a_clear_error(tiny_qwen3_moe, tmp_path):
    stacked = write_stacked(tiny_qwen3_moe, tmp_path / "transposed", transpose=True)
    adapter = create_adapter("Qwen3-30B-A3B", str(stacked), False)
    with pytest.raises(InvalidModelError, match=r"experts\.down_proj \[4, 32, 64\].*down_proj \[E, H, I\]"):
        adapter.init_model(torch.device("cpu"), load_layers=True)


# ---- block-FP8 checkpoints (DeepSeek-V3/R1 as published) ------------------------------------------------------
def write_block_fp8(source, dest, block: int = 16) -> dict[str, torch.Tensor]:
    """A copy of the checkpoint with every projection weight in float8_e4m3fn plus `_scale_inv` per block,
    as DeepSeek publishes V3/R1; returns the weights that representation stands for."""
    shutil.copytree(source, dest)
    (weights,) = dest.glob("*.safetensors")
    state, meant = load_file(weights), {}
    for name in [n for n, t in state.items() if t.dim() == 2 and n.endswith(("proj.weight", "proj_with_mqa.weight"))]:
        w = state[name]
        rows, cols = -(-w.shape[0] // block), -(-w.shape[1] // block)
        scale = torch.zeros(rows, cols)
        codes = torch.zeros_like(w, dtype=torch.float8_e4m3fn)
        meant[name] = torch.zeros_like(w)
        for i in range(rows):
            for j in range(cols):
                tile = (slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block))
                scale[i, j] = w[tile].abs().max() / 448
                codes[tile] = (w[tile] / scale[i, j]).to(torch.float8_e4m3fn)
                meant[name][tile] = codes[tile].float() * scale[i, j]
        state[name], state[f"{name}_scale_inv"] = codes, scale
    save_file(state, weights, metadata={"format": "pt"})
    config = json.loads((dest / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [block, block]}
    (dest / "config.json").write_text(json.dumps(config))
    return meant


def test_block_fp8_checkpoint_is_dequantized_on_load(tiny_deepseek_v3, tmp_path):
    source = tmp_path / "fp8"
    meant = write_block_fp8(tiny_deepseek_v3, source)
    assert {"model.layers.1.mlp.experts.3.down_proj.weight", "model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
            "model.layers.2.mlp.shared_experts.up_proj.weight"} <= meant.keys()
    assert "model.layers.1.mlp.gate.weight" not in meant  # the router stays bfloat16 in the published checkpoints
    model = create_adapter("DeepSeek-V3", str(source), False).init_model(torch.device("cpu"), load_layers=True)
    state = model.state_dict()
    for name, w in meant.items():
        assert torch.equal(state[name], w), name
    out = tmp_path / "out"
    config = write_process(tmp_path / "c.yaml", [rule("w8a8_dynamic", exclude=["lm_head", "*kv_b_proj"])])
    run_quant(source, out, config, "DeepSeek-V3")
    tensors, kept = read_tensors(out), "model.layers.1.self_attn.kv_b_proj.weight"
    assert tensors[kept].dtype == torch.float32 and torch.equal(tensors[kept], meant[kept])  # float, not float8
    assert not any(k.endswith("_scale_inv") for k in tensors)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


# ---- (h) the CLI's --quant_type path ------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("quant_type", ["w8a8", "w4a8"])
def test_cli_quant_type_on_moe_models(moe_models, tmp_path, capsys, family, quant_type):
    """`--quant_type` alone (the default practice) on both MoE families; both readers see the same model."""
    out = tmp_path / "out"
    code = main(["quant", "--model_path", str(moe_models[family]), "--save_path", str(out), "--device", "cpu",
                 "--model_type", MODEL_TYPE[family], "--quant_type", quant_type, "--allow_default_practice"])
    assert code == 0, capsys.readouterr().err
    description = json.loads((out / "quant_model_description.json").read_text())
    tag = {"w8a8": "W8A8_DYNAMIC", "w4a8": "W4A8_DYNAMIC"}[quant_type]
    assert description["model_quant_type"] == tag
    for layer in MOE_LAYERS[family]:
        assert {description[f"model.layers.{layer}.mlp.experts.{e}.{p}.weight"] for e in range(NUM_EXPERTS)
                for p in ("gate_proj", "up_proj", "down_proj")} == {tag}
        assert description[f"model.layers.{layer}.mlp.gate.weight"] == "FLOAT"
    assert description["lm_head.weight"] == "FLOAT"
    ours, reference = load_ascendv1(out), load_reference_model(out)
    original = AutoModelForCausalLM.from_pretrained(moe_models[family], dtype=torch.float32).eval()
    ids = random_ids(original.config.vocab_size, seed=1)
    our_logits = logits(ours, ids)
    torch.testing.assert_close(our_logits, logits(reference, ids), atol=1e-4, rtol=1e-4)
    float_logits = logits(original, ids)
    drift = (our_logits - float_logits).norm() / float_logits.norm()
    assert drift < (0.15 if quant_type == "w8a8" else 0.3), f"quantized model drifted {drift:.3f} from float"


# ---- the format check -----------------------------------------------------------------------------------------
def test_w4a8_experts_with_a_global_group_size_are_reported(tiny_qwen3_moe, tmp_path):
    config = write_process(tmp_path / "c.yaml", experts_and_rest("w4a8_dynamic", "w8a8_dynamic_g16"))
    report = run_quant(tiny_qwen3_moe, tmp_path / "out", config, "Qwen3-30B-A3B")
    assert any("W4A8_DYNAMIC experts with group_size 16" in w for w in report.warnings), report.warnings
    assert not any("dense linear" in w for w in report.warnings)


def test_checker_wants_one_type_per_moe_layer():
    entries = {f"model.layers.0.mlp.experts.{e}.{p}.weight": "W8A8_DYNAMIC"
               for e in range(2) for p in ("gate_proj", "down_proj")}
    assert check_moe_experts({**entries, "group_size": 0}) == []
    mixed = {**entries, "model.layers.0.mlp.experts.1.down_proj.weight": "FLOAT", "group_size": 0}
    (finding,) = check_moe_experts(mixed)
    assert finding.level == "error" and "model.layers.0.mlp.experts" in finding.message
    shared = {"model.layers.0.mlp.shared_experts.gate_proj.weight": "W8A16", **entries, "group_size": 0}
    assert check_moe_experts(shared) == []  # shared experts are dense linears
