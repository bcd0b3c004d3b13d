"""The default adapter: any decoder-only architecture transformers builds, its structure inferred from the model.

Tiny random checkpoints of architectures msmodelslim has no adapter for go end to end (quant -> check -> our
reader, logits close to float); the inferred structure enables exactly the algorithms whose algebra holds
(probes that can fail are tested to fail), and the block-by-block calibration forward reproduces the model's own.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from helpers import SCHEMES, shard_bytes, small_calib, write_config
from msmodelslim.app.quantize import quantize
from msmodelslim.app.quantize_request import QuantizeRequest
from msmodelslim.cli.__main__ import main
from msmodelslim.core.device import DeviceSpec
from msmodelslim.core.errors import ConfigError, InvalidModelError, UnsupportedError
from msmodelslim.format.ascendv1.reader import load_ascendv1
from msmodelslim.model.default import DefaultAdapter
from msmodelslim.model.inferred_structure import (infer_structure, is_weighted_rms_norm, mlp_up_down_exact,
                                                  norm_scales_by_weight)
from msmodelslim.model.interface import AttentionShape
from msmodelslim.model.registry import resolve
from msmodelslim.model.transformers_model import TransformersModel
from tiny_models import make_tokenizer

# config.json model_type -> overrides; msmodelslim has no adapter for any of them.
ARCHITECTURES = {
    "mistral": {},  # Llama-shaped: every smoothing kind and the rotation apply
    "gemma2": {"sliding_window": 4},  # four norms per block, (1 + w) norms, sliding-window and full layers alternate
    "olmo2": {},  # post-norm blocks, q/k norms over the whole projection
    "olmoe": {"num_experts": 4, "num_experts_per_tok": 2},  # routed experts, split into per-expert linears
}
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, max_position_embeddings=512, pad_token_id=0, bos_token_id=0, eos_token_id=0)
CPU = DeviceSpec("cpu")


def tiny_config(model_type: str, vocab_size: int = 320, **overrides):
    return AutoConfig.for_model(model_type, **{**SMALL, "vocab_size": vocab_size, **overrides})


def make_tiny_architecture(path: Path, model_type: str, seed: int = 0, **overrides) -> Path:
    """A randomly initialised checkpoint of `model_type` saved like a hub download (weights widened as in
    tests/tiny_models.py, so activations are non-trivial)."""
    path.mkdir(parents=True, exist_ok=True)
    config = tiny_config(model_type, len(make_tokenizer(path)), **{**ARCHITECTURES.get(model_type, {}), **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
            elif "bias" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    made: dict[str, Path] = {}

    def get(model_type: str) -> Path:
        if model_type not in made:
            made[model_type] = make_tiny_architecture(tmp_path_factory.mktemp(model_type), model_type)
        return made[model_type]

    return get


@pytest.fixture
def no_weight_reads(monkeypatch):
    def fail(*_args, **_kwargs):
        raise AssertionError("a weight was read")

    monkeypatch.setattr("msmodelslim.model.checkpoint.SafetensorsCheckpoint.load", fail)


def meta_model(model_type: str, **overrides) -> tuple[nn.Module, object]:
    config = tiny_config(model_type, **overrides)
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config), config


# ---- 1. the inferred structure ------------------------------------------------------------------------------
EXPECTED = {  # model_type: (smoothing kinds, rotation, layers with split experts, a reason that must be logged)
    "mistral": ({"norm-linear", "ov", "up-down"}, True, 0, None),
    "gemma2": (set(), False, 0, "pre_feedforward_layernorm"),
    "olmo2": (set(), False, 0, "post_feedforward_layernorm"),
    "olmoe": (set(), False, 2, "mlp holds experts, gate"),
}


@pytest.mark.parametrize("model_type", EXPECTED)
def test_the_structure_is_inferred_from_the_built_model(checkpoints, model_type, log_lines):
    adapter = DefaultAdapter("default", checkpoints(model_type))
    kinds, rotation, experts, reason = EXPECTED[model_type]
    structure = adapter.structure
    assert structure.decoder_layers == "model.layers" and structure.hf_model_types == ()
    assert {g.kind for g in structure.smooth_subgraphs} == kinds
    assert (structure.rotation is not None) == rotation
    assert adapter.inferred.routed_experts == experts
    assert structure.fused_groups == (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
    described = next(line for line in log_lines if line.startswith("default adapter for"))
    assert "2 decoder layers at model.layers" in described
    assert reason is None or reason in described, described
    assert (adapter.attention_shape() is not None) == ("ov" in kinds)


def test_probes_decide_kind_by_kind():
    # Gemma's norm scales by (1 + weight): Llama-shaped, but neither norm-linear smoothing nor the rotation holds.
    model, config = meta_model("gemma")
    inferred = infer_structure(model, config, AttentionShape(4, 2, 16))
    assert {g.kind for g in inferred.structure.smooth_subgraphs} == {"ov", "up-down"}
    assert inferred.structure.rotation is None and "GemmaRMSNorm does not scale by its weight" in inferred.describe()
    # A fused qkv_proj (Phi-3) and a non-gated MLP (GPT-NeoX) are not Llama-shaped: linear quantization only.
    for model_type, fused in (("phi3", ()), ("gpt_neox", ())):
        model, config = meta_model(model_type)
        inferred = infer_structure(model, config, AttentionShape(4, 2, 16))
        assert inferred.structure.smooth_subgraphs == () and inferred.structure.fused_groups == fused
    assert infer_structure(*meta_model("gpt_neox"), None).structure.decoder_layers == "gpt_neox.layers"


class _Rms(nn.Module):
    def __init__(self, hidden: int, offset: float = 0.0) -> None:
        super().__init__()
        self.weight, self.offset = nn.Parameter(torch.ones(hidden)), offset

    def forward(self, x):
        return (self.offset + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class _Mlp(nn.Module):
    def __init__(self, swapped: bool) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(6, 12), nn.Linear(6, 12), nn.Linear(12, 6)
        self.swapped = swapped

    def forward(self, x):
        if self.swapped:  # the activation acts on up_proj's output: scaling its rows changes the result
            return self.down_proj(nn.functional.silu(self.up_proj(x)) * self.gate_proj(x))
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def test_the_probes_can_fail():
    assert norm_scales_by_weight(_Rms(16)) and is_weighted_rms_norm(_Rms(16))
    assert not norm_scales_by_weight(_Rms(16, offset=1.0)) and not is_weighted_rms_norm(_Rms(16, offset=1.0))
    layer_norm = nn.LayerNorm(16)  # folds a scale (weight and bias divide alike) but is no RMSNorm: no rotation
    assert norm_scales_by_weight(layer_norm) and not is_weighted_rms_norm(layer_norm)
    assert mlp_up_down_exact(_Mlp(swapped=False)) and not mlp_up_down_exact(_Mlp(swapped=True))


# ---- 2. calibration forwards: every block gets its own arguments --------------------------------------------
def block_by_block(adapter: TransformersModel, forward_of, model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The last block's output when the blocks run one by one as the runner runs them."""
    generator = forward_of(model, {"input_ids": ids})
    request = next(generator)
    while True:
        output = request.module(*request.args, **request.kwargs)
        try:
            request = generator.send(output)
        except StopIteration:
            return output[0] if isinstance(output, tuple) else output


@pytest.mark.parametrize("model_type", ["gemma2", "mistral", "olmoe"])
def test_the_block_by_block_forward_is_the_model_s_own(checkpoints, model_type):
    adapter = DefaultAdapter("default", checkpoints(model_type))
    model = adapter.init_model(torch.device("cpu"), load_layers=True)
    ids = torch.randint(1, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    last = model.get_submodule(adapter.block_names(model)[-1])
    seen = []
    handle = last.register_forward_hook(lambda _m, _a, out: seen.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    handle.remove()
    with torch.no_grad():
        ours = block_by_block(adapter, adapter.generate_model_forward, model, ids)
        first_block_only = block_by_block(adapter, lambda m, b: TransformersModel.generate_model_forward(adapter, m, b),
                                          model, ids)
    assert torch.equal(ours, seen[0])
    # Gemma 2 alternates sliding-window (4 tokens) and full layers: reusing block 0's mask for every block,
    # as the family adapters do, would calibrate the full layers on the wrong attention.
    assert torch.equal(first_block_only, seen[0]) == (model_type != "gemma2")


# ---- 3. end to end: quant -> check -> our reader --------------------------------------------------------------
def relative_logit_error(source: Path, out: Path) -> float:
    original = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    ours = load_ascendv1(out)
    ids = torch.randint(1, original.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        float_logits, our_logits = original(input_ids=ids).logits, ours(input_ids=ids).logits
    return float((our_logits - float_logits).norm() / float_logits.norm())


@pytest.mark.parametrize("model_type", list(ARCHITECTURES))
def test_end_to_end_with_calibration(checkpoints, tmp_path, capsys, model_type):
    source, out = checkpoints(model_type), tmp_path / "out"
    scheme = "w8a8_dynamic" if model_type == "olmoe" else "w8a8_static"  # routed experts take dynamic only
    config = write_config(tmp_path / "c.yaml", SCHEMES[scheme], dataset=small_calib(tmp_path))
    assert main(["quant", "--model_path", str(source), "--save_path", str(out), "--device", "cpu",
                 "--model_type", "default", "--config_path", str(config)]) == 0, capsys.readouterr().err
    assert main(["check", str(out)]) == 0
    assert "0 error(s), 0 warning(s)" in capsys.readouterr().out
    description = json.loads((out / "quant_model_description.json").read_text())
    expected = "W8A8_DYNAMIC" if model_type == "olmoe" else "W8A8"
    assert description["model.layers.1.mlp.experts.3.down_proj.weight" if model_type == "olmoe"
                       else "model.layers.1.mlp.down_proj.weight"] == expected
    # As in test_ascendv1_roundtrip: static ranges come from 6 short texts while the probe is random tokens.
    assert relative_logit_error(source, out) < (0.05 if scheme == "w8a8_dynamic" else 0.15)


def test_the_default_practice_is_asked_for_and_runs(checkpoints, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    argv = ["quant", "--model_path", str(checkpoints("olmo2")), "--save_path", str(tmp_path / "o"), "--device", "cpu",
            "--model_type", "default", "--quant_type", "w8a8"]
    assert main(argv) == 5 and "--allow_default_practice" in capsys.readouterr().err  # generic: never silently
    assert main(argv + ["--allow_default_practice"]) == 0
    assert (tmp_path / "o" / "default_best_practice.yaml").is_file()
    assert relative_logit_error(checkpoints("olmo2"), tmp_path / "o") < 0.05


def test_smoothing_and_rotation_on_a_llama_shaped_model_leave_it_unchanged(tmp_path):
    source = make_tiny_architecture(tmp_path / "src", "mistral", seed=3)
    with torch.no_grad():  # outlier channels, so that the scales are far from 1
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        for layer in model.model.layers:
            layer.input_layernorm.weight[[3, 17]] *= 40
            layer.post_attention_layernorm.weight[5] *= 25
        model.save_pretrained(source)
    process = [{"type": "smooth_quant", "alpha": 0.5, "enable_subgraph_type": ["norm-linear", "ov", "up-down"]},
               {"type": "quarot"}]
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"apiversion": "modelslim_v1",
                                      "spec": {"process": process, "dataset": small_calib(tmp_path)}}))
    quantize(QuantizeRequest(model_path=source, save_path=tmp_path / "out", model_type="default", device=CPU,
                             config_path=config))
    changed = load_ascendv1(tmp_path / "out")
    ids = torch.randint(1, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before, after = model(input_ids=ids).logits, changed(input_ids=ids).logits
    assert torch.allclose(before, after, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(changed.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight)


def test_on_a_llama_checkpoint_it_writes_what_the_llama_adapter_writes(tiny_llama, tmp_path):
    process = [{"type": "smooth_quant", "alpha": 0.5, "enable_subgraph_type": ["norm-linear", "ov", "up-down"]},
               {"type": "linear_quant", "qconfig": SCHEMES["w8a8_static"], "exclude": ["lm_head"]}]
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"apiversion": "modelslim_v1",
                                      "spec": {"process": process, "dataset": small_calib(tmp_path)}}))
    outputs = {}
    for model_type in ("default", "Llama-2-7B"):
        outputs[model_type] = tmp_path / model_type
        quantize(QuantizeRequest(model_path=tiny_llama, save_path=outputs[model_type], model_type=model_type,
                                 device=CPU, config_path=config))
    assert shard_bytes(outputs["default"]) == shard_bytes(outputs["Llama-2-7B"])


# ---- 4. what it refuses, before any weight is read ------------------------------------------------------------
@pytest.mark.parametrize("model_type,step,needle", [
    ("gemma2", {"type": "smooth_quant"}, "adapter DefaultAdapter describes no smoothing subgraphs"),
    ("olmo2", {"type": "quarot"}, "adapter DefaultAdapter does not describe where to rotate"),
])
def test_algorithms_its_structure_does_not_support_are_refused_by_name(checkpoints, tmp_path, no_weight_reads,
                                                                       model_type, step, needle):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"apiversion": "modelslim_v1",
                                      "spec": {"process": [step], "dataset": small_calib(tmp_path)}}))
    with pytest.raises(UnsupportedError, match=needle):
        quantize(QuantizeRequest(model_path=checkpoints(model_type), save_path=tmp_path / "o", model_type="default",
                                 device=CPU, config_path=config))
    assert not (tmp_path / "o").exists()


def _config_dir(path: Path, config: dict) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("config,error,needle", [
    ({"model_type": "t5", "d_model": 64, "num_layers": 2, "num_heads": 4, "d_kv": 16, "d_ff": 128,
      "vocab_size": 320}, UnsupportedError, "is an encoder-decoder model"),
    ({**tiny_config("llama").to_dict(), "vision_config": {"hidden_size": 32}}, UnsupportedError,
     r"has vision_config: vision-language models are not supported yet \(issue: VLM pipeline\)"),
    ({"model_type": "evilarch", "hidden_size": 64}, InvalidModelError, "is not a config transformers can load"),
])
def test_what_the_default_adapter_cannot_build_is_refused(tmp_path, no_weight_reads, config, error, needle):
    w8a16 = write_config(tmp_path / "c.yaml", SCHEMES["w8a16"])
    request = QuantizeRequest(model_path=_config_dir(tmp_path / "m", config), save_path=tmp_path / "o",
                              model_type="default", device=CPU, config_path=w8a16)
    with pytest.raises(error, match=needle):
        quantize(request)
    assert not (tmp_path / "o").exists()


def test_a_checkpoint_with_renamed_weights_is_refused_before_any_read(tmp_path, no_weight_reads):
    # transformers saves Mixtral under its published names (block_sparse_moe.experts.<e>.w1) and renames them
    # while loading; the default adapter reads by the model's own names, so it says so instead of failing later.
    source = make_tiny_architecture(tmp_path / "mixtral", "mixtral", num_local_experts=4, num_experts_per_tok=2)
    with pytest.raises(UnsupportedError, match="block_sparse_moe.experts.0.w1.weight.*does not rename them yet"):
        DefaultAdapter("default", source)


# ---- 5. when an unregistered name gets the default adapter ----------------------------------------------------
def test_an_unregistered_name_gets_the_default_adapter_only_for_an_architecture_no_adapter_serves(
        checkpoints, tiny_llama, tmp_path, log_lines):
    entry = resolve("OLMo-2-0425-1B", checkpoints("olmo2"))
    assert entry.key == "default" and entry.pedigree == "default"
    warning = next(line for line in log_lines if "is not registered" in line)
    assert "'olmo2' (Olmo2ForCausalLM): using the default adapter" in warning and "--model_type default" in warning
    # A checkpoint of a family we serve: a typo or an unregistered variant; its adapter fits better.
    with pytest.raises(ConfigError, match=r"closest: Llama-3.1-70B-Instruct.*'llama' is served by: .*pass one of them"):
        resolve("Llama-3.3-70B-Instruct", tiny_llama)
    # config.json's architecture unknown to transformers: refused, saying why.
    odd = _config_dir(tmp_path / "odd", {"model_type": "evilarch"})
    with pytest.raises(ConfigError, match="'evilarch' is not a decoder-only architecture transformers knows"):
        resolve("Evil-7B", odd)


def test_the_run_with_an_unregistered_name_goes_through(checkpoints, tmp_path, capsys):
    out = tmp_path / "o"
    argv = ["quant", "--model_path", str(checkpoints("olmo2")), "--save_path", str(out), "--device", "cpu",
            "--model_type", "OLMo-2-0425-1B", "--quant_type", "w8a16", "--allow_default_practice"]
    assert main(argv) == 0, capsys.readouterr().err
    assert (out / "OLMo-2-0425-1B_best_practice.yaml").is_file()


def test_without_model_type_an_unserved_architecture_is_refused_naming_default(checkpoints, tmp_path, capsys):
    w8a16 = write_config(tmp_path / "c.yaml", SCHEMES["w8a16"])
    argv = ["quant", "--model_path", str(checkpoints("olmo2")), "--save_path", str(tmp_path / "o"), "--device", "cpu",
            "--config_path", str(w8a16)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "'olmo2', which no registered adapter serves" in err and "or --model_type default" in err, err


def test_config_dtype_reads_both_spellings_without_the_deprecation_warning(tmp_path, caplog):
    """`dtype`, a legacy `torch_dtype` key (transformers 5 reads it into `dtype`), none (float32); and no
    "`torch_dtype` is deprecated" warning from reading a config without a dtype."""
    import json
    import logging
    from types import SimpleNamespace

    import torch
    from transformers import AutoConfig, LlamaConfig

    from msmodelslim.model.transformers_model import config_dtype

    LlamaConfig(dtype="bfloat16").save_pretrained(tmp_path / "new")
    assert config_dtype(AutoConfig.from_pretrained(tmp_path / "new")) == torch.bfloat16
    LlamaConfig().save_pretrained(tmp_path / "old")
    legacy = json.loads((tmp_path / "old" / "config.json").read_text())
    legacy.pop("dtype", None)
    legacy["torch_dtype"] = "float16"
    (tmp_path / "old" / "config.json").write_text(json.dumps(legacy))
    assert config_dtype(AutoConfig.from_pretrained(tmp_path / "old")) == torch.float16
    assert config_dtype(SimpleNamespace(torch_dtype="float16")) == torch.float16  # a config object of old
    undeclared = LlamaConfig()
    undeclared.dtype = None
    with caplog.at_level(logging.WARNING):
        assert config_dtype(undeclared) == torch.float32
    assert "deprecated" not in caplog.text
