"""QuaRot: Hadamard constructions, float-exact rotation (also with tied embeddings and sizes that are not a
power of two), identical layer_wise/model_wise output, and composition with quantization."""
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from helpers import SCHEMES, STATIC_W8A8_STEP, outputs_of_both_runners, run_quant, write_pipeline
from msmodelslim.core.errors import ConfigError, UnsupportedError
from msmodelslim.format.ascendv1.reader import load_ascendv1
from msmodelslim.processor.quarot.hadamard import hadamard, random_rotation
from tiny_models import make_tiny_model

MODEL_TYPE = {"llama": "Llama-2-7B", "qwen2": "Qwen2-7B", "qwen3": "Qwen3-8B"}


def with_norm_weights(source):
    """Tiny models start with all norm weights 1, which would hide a missing norm fold."""
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(0.5 + torch.rand(param.shape, generator=g))
    model.save_pretrained(source)
    return model


def logits(model, seed=1):
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 28, 36, 44, 48, 64, 72, 96, 576, 1536])
def test_hadamard_matrices_are_hadamard(n):
    h = hadamard(n)
    assert h is not None
    assert set(h.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


def test_random_rotation_is_orthogonal_seeded_and_falls_back_when_no_hadamard_is_known():
    q0, is_h = random_rotation(576, seed=0)
    assert is_h and torch.allclose(q0 @ q0.T, torch.eye(576, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(q0.abs(), torch.full_like(q0, 576**-0.5))  # even spreading
    assert not torch.equal(q0, random_rotation(576, seed=1)[0])
    assert torch.equal(q0, random_rotation(576, seed=0)[0])
    q, is_h = random_rotation(52, seed=0)  # no construction here reaches 52
    assert not is_h and torch.allclose(q @ q.T, torch.eye(52, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("family,tie,overrides", [
    ("llama", False, {}),
    ("llama", True, {"hidden_size": 48, "head_dim": 12}),  # neither size a power of two
    ("qwen2", False, {}),
    ("qwen3", True, {}),
])
def test_rotation_alone_leaves_the_float_model_unchanged(tmp_path, family, tie, overrides):
    source = make_tiny_model(tmp_path / "src", family, tie=tie, seed=5, **overrides)
    model = with_norm_weights(source)
    out = tmp_path / "out"
    run_quant(source, out, write_pipeline(tmp_path / "c.yaml", [{"type": "quarot", "seed": 3}]), MODEL_TYPE[family])
    rotated = load_ascendv1(out)
    assert torch.allclose(logits(model), logits(rotated), rtol=1e-4, atol=1e-4)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    description = json.loads((out / "quant_model_description.json").read_text())
    assert description["lm_head.weight"] == "FLOAT" and description["model.embed_tokens.weight"] == "FLOAT"
    assert not torch.allclose(rotated.lm_head.weight, rotated.model.embed_tokens.weight)
    assert torch.allclose(rotated.model.layers[0].input_layernorm.weight, torch.ones(1))
    q = load_file(out / "optional" / "quarot.safetensors")["global_rotation"]
    assert description["optional"] == {"quarot": {"rotation_map": {"global_rotation": "optional/quarot.safetensors"}}}
    assert torch.allclose(model.model.embed_tokens.weight @ q, rotated.model.embed_tokens.weight, atol=1e-5)


def test_keeping_the_tie_would_break_the_model(tmp_path):
    """Why the output is untied: re-tying lm_head to the rotated embedding changes the logits a lot."""
    source = make_tiny_model(tmp_path / "src", "llama", tie=True, seed=5)
    model = with_norm_weights(source)
    out = tmp_path / "out"
    run_quant(source, out, write_pipeline(tmp_path / "c.yaml", [{"type": "quarot"}]))
    rotated = load_ascendv1(out)
    with torch.no_grad():
        rotated.lm_head.weight = rotated.model.embed_tokens.weight
    assert (logits(rotated) - logits(model)).abs().max() > 0.1


def test_layer_wise_equals_model_wise(tiny_qwen2, tmp_path):
    process = [{"type": "quarot"}, {"type": "flex_smooth_quant", "act_scope": "per_tensor"}, STATIC_W8A8_STEP]
    layer_wise, model_wise = outputs_of_both_runners(tiny_qwen2, tmp_path, process, "Qwen2-7B")
    assert "optional/quarot.safetensors" in layer_wise
    assert layer_wise == model_wise


def test_rotation_lowers_w8a8_dynamic_error_on_residual_outliers(tmp_path):
    source = make_tiny_model(tmp_path / "src", "llama", seed=2)
    with torch.no_grad():  # massive residual-stream channels, as in real LLMs
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        model.model.embed_tokens.weight[:, [3, 40]] *= 30
        model.save_pretrained(source)
    reference = logits(model)
    errors = {}
    for name, process in {"rtn": [], "quarot": [{"type": "quarot"}]}.items():
        group = {"type": "linear_quant", "qconfig": SCHEMES["w8a8_dynamic"], "exclude": ["lm_head"]}
        out = tmp_path / name
        run_quant(source, out, write_pipeline(tmp_path / f"{name}.yaml", process + [group]))
        errors[name] = (logits(load_ascendv1(out)) - reference).pow(2).mean().item()
    assert errors["quarot"] < 0.6 * errors["rtn"], errors


def test_online_rotation_and_bad_block_sizes_are_refused(tiny_llama, tmp_path):
    with pytest.raises(ConfigError, match="down_proj_online_layers .* needs online: true"):
        run_quant(tiny_llama, tmp_path / "o", write_pipeline(tmp_path / "a.yaml", [{"type": "quarot",
                                                                           "down_proj_online_layers": [0]}]))
    with pytest.raises(ConfigError, match=r"block_size.*must be -1 or a power of 2"):
        run_quant(tiny_llama, tmp_path / "o",
                  write_pipeline(tmp_path / "b.yaml", [{"type": "quarot", "block_size": 12}]))
    with pytest.raises(UnsupportedError, match="block_size 128 does not divide the hidden size 64"):
        run_quant(tiny_llama, tmp_path / "o",
                  write_pipeline(tmp_path / "c.yaml", [{"type": "quarot", "block_size": 128}]))
    assert not (tmp_path / "o").exists()


def test_block_rotation_is_exact(tiny_llama, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    out = tmp_path / "out"
    run_quant(tiny_llama, out,
              write_pipeline(tmp_path / "c.yaml", [{"type": "quarot", "block_size": 16, "export_extra_info": False}]))
    assert torch.allclose(logits(model), logits(load_ascendv1(out)), rtol=1e-4, atol=1e-4)
    assert not (out / "optional").exists()


def test_an_adapter_without_the_rotation_interface_is_named():
    from msmodelslim.model.interface import AttentionShape, ModelStructure
    from msmodelslim.processor.base import ProcessorContext
    from msmodelslim.processor.quarot.config import QuaRotConfig
    from msmodelslim.processor.quarot.processor import QuaRotProcessor

    context = ProcessorContext("MyAdapter", ModelStructure(), AttentionShape(4, 2, 16))
    with pytest.raises(UnsupportedError, match=r"adapter MyAdapter does not describe where to rotate \(ModelStructure.rotation"):
        QuaRotProcessor(QuaRotConfig(type="quarot"), context)
