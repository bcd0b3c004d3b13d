"""The text families of model/glm.py, deepseek.py, minimax.py, qwen_next.py and longcat.py on tiny random
checkpoints saved as the families publish them: the adapter loads the float model exactly; `msmodelslim quant`
(W8A8 dynamic, layer_wise) writes a checkpoint that `msmodelslim check` accepts (every input tensor accounted
for), that our reader turns back into a model close to the float one, and whose description is the dry run's
plan; every checkpoint tensor reaches the output or is reported unused. Family specifics: MiniMax's on-disk
names, the tensors the engine runs in float, the DeepSeek-V3.2 / GLM-5 indexer entries, LongCat's identity
experts, Kimi-K2's config.json read as data, DeepSeek-V4's native names."""
import json
import shutil
import statistics

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, DeepseekV3Config

from helpers import SCHEMES
from msmodelslim.app.quantize import quantize
from msmodelslim.app.quantize_request import QuantizeRequest
from msmodelslim.cli.__main__ import main
from msmodelslim.core.device import DeviceSpec
from msmodelslim.core.errors import UnsupportedError
from msmodelslim.format.ascendv1.reader import load_ascendv1
from msmodelslim.model.deepseek import INDEXER_HIDDEN_READERS, INDEXER_Q_READERS, with_indexer_readers
from msmodelslim.model.families import DeepseekV3Adapter
from msmodelslim.model.interface import ModelStructure, SmoothSubgraph
from msmodelslim.model.registry import create_adapter
from msmodelslim.model.rotation import RotationStructure
from msmodelslim.model.skeleton_edits import EngineFloatLinear, normalized_hadamard
from tiny_models import make_tiny_model

MODEL_TYPE = {"glm4_moe": "GLM-4.5", "glm4_moe_lite": "GLM-4.7-Flash", "glm_moe_dsa": "GLM-5",
              "deepseek_v32": "DeepSeek-V3.2", "kimi_k2": "Kimi-K2-Instruct-0905", "minimax_m2": "MiniMax-M2.7",
              "qwen3_next": "Qwen3-Next-80B-A3B-Instruct", "longcat_flash": "LongCat-Flash-Chat",
              "step3p5": "Step-3.5-Flash"}
FAMILIES = list(MODEL_TYPE)
EXPERT_0 = {  # (layer, expert 0's three on-disk linears) of a sparse layer
    "glm4_moe": ("model.layers.1.mlp.experts.0", ("gate_proj", "up_proj", "down_proj")),
    "glm4_moe_lite": ("model.layers.1.mlp.experts.0", ("gate_proj", "up_proj", "down_proj")),
    "glm_moe_dsa": ("model.layers.1.mlp.experts.0", ("gate_proj", "up_proj", "down_proj")),
    "deepseek_v32": ("model.layers.1.mlp.experts.0", ("gate_proj", "up_proj", "down_proj")),
    "kimi_k2": ("model.layers.1.mlp.experts.0", ("gate_proj", "up_proj", "down_proj")),
    "minimax_m2": ("model.layers.0.block_sparse_moe.experts.0", ("w1", "w3", "w2")),
    "qwen3_next": ("model.layers.0.mlp.experts.0", ("gate_proj", "up_proj", "down_proj")),
    "longcat_flash": ("model.layers.0.mlp.experts.0", ("gate_proj", "up_proj", "down_proj")),
    "step3p5": ("model.layers.2.moe.experts.0", ("gate_proj", "up_proj", "down_proj")),
}
# Linears the engine builds without quantization: never planned, written FLOAT
ENGINE_FLOAT = {
    "glm_moe_dsa": ["model.layers.1.self_attn.indexer.wk", "model.layers.1.self_attn.indexer.weights_proj"],
    "deepseek_v32": ["model.layers.0.self_attn.indexer.wk", "model.layers.2.self_attn.indexer.weights_proj"],
    "qwen3_next": ["model.layers.0.linear_attn.in_proj_ba", "model.layers.3.mlp.shared_expert_gate"],
    "longcat_flash": ["model.layers.1.mlp.router.classifier"],
}
DSA = ("glm_moe_dsa", "deepseek_v32")
W8A8_DYNAMIC = {"type": "linear_quant", "qconfig": SCHEMES["w8a8_dynamic"], "include": ["*"], "exclude": ["lm_head"]}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny checkpoints, built on first use."""
    made = {}

    def get(family: str):
        if family not in made:
            made[family] = make_tiny_model(tmp_path_factory.mktemp(family), family)
        return made[family]

    return get


def write_yaml(path, process: list[dict], runner: str = "layer_wise"):
    path.write_text(yaml.safe_dump({"apiversion": "modelslim_v1", "spec": {"runner": runner, "process": process}}))
    return path


def random_ids(vocab: int = 320, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(seed))


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def float_reference(source, family: str):
    """The float model as transformers builds it from the checkpoint, independently of msmodelslim."""
    if family == "kimi_k2":  # transformers has no kimi_k2 type: its config.json is DeepSeek-V3's
        config = json.loads((source / "config.json").read_text())
        # (as model_type deepseek_v3, so that transformers stacks the per-expert weights it finds on disk)
        config = DeepseekV3Config.from_dict({k: v for k, v in config.items() if k not in ("auto_map", "model_type")})
        return AutoModelForCausalLM.from_pretrained(source, config=config, dtype=torch.float32).eval()
    if family == "longcat_flash":
        # transformers' fused LongCat experts keep gate/up rows for the weightless identity experts, which the
        # published checkpoint (and ours) lacks: stack the routed experts and leave those rows zero
        state = load_file(next(source.glob("*.safetensors")))
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source), dtype=torch.float32).eval()
        for layer in range(len(model.model.layers)):
            experts = model.model.layers[layer].mlp.experts
            prefix = f"model.layers.{layer}.mlp.experts"
            gate_up = torch.zeros_like(experts.gate_up_proj)
            for e in range(experts.down_proj.shape[0]):
                gate_up[e] = torch.cat([state.pop(f"{prefix}.{e}.gate_proj.weight"),
                                        state.pop(f"{prefix}.{e}.up_proj.weight")])
            state[f"{prefix}.gate_up_proj"] = gate_up
            state[f"{prefix}.down_proj"] = torch.stack([state.pop(f"{prefix}.{e}.down_proj.weight")
                                                        for e in range(experts.down_proj.shape[0])])
        assert model.load_state_dict(state, strict=False).missing_keys == [], "reference incomplete"
        return model
    if family == "step3p5":  # transformers' Step-3.5 text model, the published names mapped back to its own
        from msmodelslim.model.step import register_causal_lm

        model = register_causal_lm()(AutoConfig.from_pretrained(source)).eval()
        published = load_file(next(source.glob("*.safetensors")))
        state = {}
        for name, tensor in published.items():
            if ".moe." in name:
                block = name.split(".moe.")[0]
                if name.endswith(".moe.up_proj.weight"):
                    continue
                if name.endswith(".moe.gate_proj.weight"):
                    state[f"{block}.mlp.experts.gate_up_proj"] = torch.cat([tensor, published[f"{block}.moe.up_proj.weight"]], 1)
                    continue
                name = (name.replace(".moe.down_proj.weight", ".mlp.experts.down_proj")
                        .replace(".moe.router_bias", ".mlp.gate.e_score_correction_bias")
                        .replace(".moe.share_expert.", ".mlp.shared_experts.").replace(".moe.", ".mlp."))
            state[name] = tensor
        model.load_state_dict(state, strict=True)
        return model
    return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()


def tensor_names(path) -> set[str]:
    names = set()
    for file in path.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            names |= set(f.keys())
    return names


def read_tensor(path, name: str) -> torch.Tensor:
    for file in path.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            if name in f.keys():
                return f.get_tensor(name)
    raise KeyError(name)


# ---- loading ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_loads_the_float_model_of_the_published_layout(checkpoints, family):
    source = checkpoints(family)
    adapter = create_adapter(MODEL_TYPE[family], str(source), False)
    model = adapter.init_model(torch.device("cpu"), load_layers=True)
    ids = random_ids()
    expected = logits(float_reference(source, family), ids)
    assert expected.abs().max() > 0.1, "a degenerate tiny model would hide mistakes"
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-5, rtol=1e-5)
    layer, projections = EXPERT_0[family]
    names = set(model.state_dict())
    assert {f"{layer}.{p}.weight" for p in projections} <= names, "experts carry their on-disk names"
    assert adapter.unused_checkpoint_tensors(adapter.init_skeleton()) == []


# ---- quant -> check -> read back; the dry run's plan is what is written ----------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_w8a8_dynamic_end_to_end(checkpoints, tmp_path, capsys, family):
    source = checkpoints(family)
    config = write_yaml(tmp_path / "w8a8.yaml", [W8A8_DYNAMIC])
    plan = quantize(QuantizeRequest(model_path=source, save_path=tmp_path / "dry", model_type=MODEL_TYPE[family],
                                    device=DeviceSpec("cpu"), config_path=config, dry_run=True)).plan
    assert not (tmp_path / "dry").exists()
    out = tmp_path / "out"
    code = main(["quant", "--model_path", str(source), "--save_path", str(out), "--device", "cpu",
                 "--model_type", MODEL_TYPE[family], "--config_path", str(config)])
    assert code == 0, capsys.readouterr().err
    code = main(["check", str(out), "--model_path", str(source)])
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err

    description = json.loads((out / "quant_model_description.json").read_text())
    written = {k[: -len(".weight")]: v for k, v in description.items()
               if k.endswith(".weight") and k[: -len(".weight")] in plan}
    assert written == plan, "the dry run's plan is what the description says"
    assert {v for v in plan.values()} == {"W8A8_DYNAMIC", "FLOAT"} and plan["lm_head"] == "FLOAT"
    layer, projections = EXPERT_0[family]
    for p in projections:
        assert description[f"{layer}.{p}.weight"] == "W8A8_DYNAMIC"
    for name in ENGINE_FLOAT.get(family, []):
        assert name not in plan and description[f"{name}.weight"] == "FLOAT"
    assert not any(k.startswith("model.layers.") and ".mlp." in k and k.endswith("gate_up_proj") for k in description)

    # every tensor of the checkpoint reaches the output (itself or quantized under its name) or is reported unused
    adapter = create_adapter(MODEL_TYPE[family], str(source), False)
    unused = set(adapter.unused_checkpoint_tensors(adapter.init_skeleton()))
    output = tensor_names(out)
    stacked = {where.tensor for n in output if (where := adapter.stacked_source(n)) is not None}  # Step-3.5's
    assert tensor_names(source) <= output | unused | stacked

    float_model, ours = float_reference(source, family), load_ascendv1(out)
    if family in DSA:
        # The tiny indexer keeps 8 of 24 keys: a 0.4% weight perturbation already moves the float logits by ~20%
        # through changed selections. Both models select every key here, so the drift measures quantization.
        for model in (float_model, ours):
            all_keys(model)
    # The median over five inputs: in a tiny random MoE a perturbed hidden state can flip a token's top-k experts,
    # which moves one input's drift by up to 5x (LongCat-Flash as transformers 5.25 builds it: 0.024-0.151 over
    # six inputs); a wrong scale or a misplaced tensor moves every input's.
    drifts = []
    for seed in range(1, 6):
        ids = random_ids(seed=seed)
        float_logits = logits(float_model, ids)
        drifts.append(((logits(ours, ids) - float_logits).norm() / float_logits.norm()).item())
    drift = statistics.median(drifts)
    print(f"{family}: W8A8 dynamic drift from float over five inputs {[round(d, 3) for d in drifts]}")
    assert drift < 0.15, f"quantized {family} drifted {drift:.3f} from float (median of {drifts})"


@pytest.mark.parametrize("family", [*FAMILIES, "deepseek_v4"])
def test_compressed_tensors_output_reads_back_as_its_ascendv1_twin(checkpoints, tmp_path, capsys, family):
    """One run writing both formats: `msmodelslim check` passes on it, and our compressed-tensors reader rebuilds
    the family's skeleton from the written folder (never opening it as a quantization source) with exactly the
    layers our ascendv1 reader builds: equal logits."""
    from msmodelslim.format.compressed_tensors.reader import load_compressed_tensors

    config = tmp_path / "both.yaml"
    config.write_text(yaml.safe_dump({"apiversion": "modelslim_v1", "spec": {
        "runner": "layer_wise", "process": [W8A8_DYNAMIC],
        "save": [{"type": "ascendv1_saver"}, {"type": "compressed_tensors"}]}}))
    out = tmp_path / "out"
    code = main(["quant", "--model_path", str(checkpoints(family)), "--save_path", str(out), "--device", "cpu",
                 "--model_type", V4 if family == "deepseek_v4" else MODEL_TYPE[family], "--config_path", str(config)])
    assert code == 0, capsys.readouterr().err
    code = main(["check", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err
    ids = random_ids(seed=1)
    from_compressed = logits(load_compressed_tensors(out / "compressed_tensors"), ids)
    assert torch.equal(from_compressed, logits(load_ascendv1(out / "ascendv1"), ids))


def all_keys(model) -> None:
    """Make every sparse-attention indexer of `model` select all keys (index_topk beyond any sequence)."""
    indexers = [m for m in model.modules() if hasattr(m, "index_topk")]
    assert indexers
    for indexer in indexers:
        indexer.index_topk = 1 << 30


# ---- family specifics ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", DSA)
def test_indexer_entries_and_rotations(checkpoints, tmp_path, family):
    source = checkpoints(family)
    out = tmp_path / "out"
    config = write_yaml(tmp_path / "c.yaml", [{**W8A8_DYNAMIC, "exclude": ["lm_head", "*kv_b_proj"]}])
    quantize(QuantizeRequest(model_path=source, save_path=out, model_type=MODEL_TYPE[family],
                             device=DeviceSpec("cpu"), config_path=config))
    description = json.loads((out / "quant_model_description.json").read_text())
    assert description["indexer_quant_type"] == "INT8_DYNAMIC"
    hadamard = normalized_hadamard(16)
    assert torch.allclose(hadamard @ hadamard.T, torch.eye(16), atol=1e-6)
    for layer in range(3):
        attn = f"model.layers.{layer}.self_attn"
        assert description[f"{attn}.indexer.quant_type"] == "INT8_DYNAMIC"
        for rotation in ("q_rot", "k_rot"):
            tensor = read_tensor(out, f"{attn}.indexer.{rotation}")
            assert tensor.dtype == torch.float32 and torch.equal(tensor, hadamard)
            assert description[f"{attn}.indexer.{rotation}"] == "FLOAT"
        assert description[f"{attn}.indexer.wq_b.weight"] == "W8A8_DYNAMIC"  # quantizable: it reads the q latent
        assert description[f"{attn}.kv_b_proj.weight"] == "FLOAT"
    assert not any(k.endswith(("q_rot", "k_rot")) for k in tensor_names(source)), "generated, not read"


def test_indexer_readers_join_the_mla_subgraphs_and_rotation():
    base = ModelStructure(
        smooth_subgraphs=(SmoothSubgraph("norm-linear", "input_layernorm", ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa")),
                          SmoothSubgraph("norm-linear", "input_layernorm", ("self_attn.q_proj", "self_attn.kv_a_proj_with_mqa")),
                          SmoothSubgraph("norm-linear", "self_attn.q_a_layernorm", ("self_attn.q_b_proj",)),
                          SmoothSubgraph("up-down", "mlp.up_proj", ("mlp.down_proj",))),
        rotation=RotationStructure(norm_readers=(("input_layernorm", ("self_attn.q_a_proj", "self_attn.q_proj")),
                                                 ("post_attention_layernorm", ("mlp.gate_proj",))),
                                   writers=("self_attn.o_proj",)))
    extended = with_indexer_readers(base)
    q_a, q, q_b, up_down = extended.smooth_subgraphs
    assert q_a.targets[-2:] == INDEXER_HIDDEN_READERS and q_b.targets[-1:] == INDEXER_Q_READERS
    assert q == base.smooth_subgraphs[1] and up_down == base.smooth_subgraphs[3]  # no query LoRA: no indexer
    assert dict(extended.rotation.norm_readers)["input_layernorm"][-2:] == INDEXER_HIDDEN_READERS
    assert dict(extended.rotation.norm_readers)["post_attention_layernorm"] == ("mlp.gate_proj",)


@pytest.mark.parametrize("family", DSA)
def test_smoothing_scales_the_indexer_with_the_attention(checkpoints, tmp_path, monkeypatch, family):
    """smooth_quant moves scales from input_layernorm / q_a_layernorm into their readers, the indexer's among them:
    the float model is unchanged. Without the indexer's projections among the readers (DeepSeek-V3's structure)
    its scores, and so its key selection, would change."""
    from dataclasses import replace

    from helpers import small_calib
    from msmodelslim.model.registry import adapter_class

    source, model_type = checkpoints(family), MODEL_TYPE[family]
    nothing = {"type": "linear_quant", "qconfig": SCHEMES["w8a16"], "include": ["*no_such_layer*"]}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"apiversion": "modelslim_v1", "spec": {
        "runner": "layer_wise", "dataset": small_calib(tmp_path), "process": [{"type": "smooth_quant"}, nothing]}}))
    ids, float_logits = random_ids(seed=2), logits(float_reference(source, family), random_ids(seed=2))

    def smoothed_logits(out) -> torch.Tensor:
        quantize(QuantizeRequest(model_path=source, save_path=out, model_type=model_type, device=DeviceSpec("cpu"),
                                 config_path=config))
        wk = "model.layers.1.self_attn.indexer.wk.weight"
        return logits(load_ascendv1(out), ids), not torch.equal(read_tensor(out, wk), read_tensor(source, wk))

    smoothed, wk_scaled = smoothed_logits(tmp_path / "out")
    assert wk_scaled and (smoothed - float_logits).abs().max() < 1e-4
    cls = adapter_class(model_type)
    monkeypatch.setattr(cls, "structure", replace(DeepseekV3Adapter.structure, hf_model_types=cls.structure.hf_model_types))
    without, wk_scaled = smoothed_logits(tmp_path / "without")
    assert not wk_scaled and (without - float_logits).abs().max() > 0.1, "the test can tell"


@pytest.mark.parametrize("family,model_type", [("glm4_moe_lite", "GLM-4.7-Flash"), ("glm_moe_dsa", "GLM-5"),
                                               ("deepseek_v32", "DeepSeek-V3.2"), ("kimi_k2", "Kimi-K2-Thinking")])
def test_mla_families_are_deepseek_v3_adapters(family, model_type):
    from msmodelslim.model.registry import adapter_class

    cls = adapter_class(model_type)
    assert issubclass(cls, DeepseekV3Adapter)
    expected = DeepseekV3Adapter.structure
    if family in DSA:
        expected = with_indexer_readers(expected)
    assert cls.structure.fused_groups == expected.fused_groups
    assert cls.structure.smooth_subgraphs == expected.smooth_subgraphs and cls.structure.rotation == expected.rotation


def test_minimax_on_disk_names_and_stacked_checkpoint(checkpoints, tmp_path):
    source = checkpoints("minimax_m2")
    names = tensor_names(source)
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in names  # as transformers saves MiniMax
    assert "model.layers.1.block_sparse_moe.e_score_correction_bias" in names
    # the same weights stacked under the on-disk block name load to the same model
    stacked = tmp_path / "stacked"
    shutil.copytree(source, stacked)
    (weights,) = stacked.glob("*.safetensors")
    state = load_file(weights)
    for layer in (0, 1):
        p = f"model.layers.{layer}.block_sparse_moe.experts"
        state[f"{p}.gate_up_proj"] = torch.stack([torch.cat([state.pop(f"{p}.{e}.w1.weight"),
                                                             state.pop(f"{p}.{e}.w3.weight")]) for e in range(4)])
        state[f"{p}.down_proj"] = torch.stack([state.pop(f"{p}.{e}.w2.weight") for e in range(4)])
    save_file(state, weights, metadata={"format": "pt"})
    ids = random_ids()
    a = create_adapter("MiniMax-M2.7", str(source), False).init_model(torch.device("cpu"), load_layers=True)
    b = create_adapter("MiniMax-M2.7", str(stacked), False).init_model(torch.device("cpu"), load_layers=True)
    assert torch.equal(logits(a, ids), logits(b, ids))
    assert a.model.layers[0].mlp is a.model.layers[0].block_sparse_moe  # transformers' forward still finds it


def test_engine_float_linears_are_never_planned(checkpoints, tmp_path):
    """include '*' reaches every nn.Linear; Qwen3-Next's in_proj_ba and shared_expert_gate are not among them."""
    source = checkpoints("qwen3_next")
    adapter = create_adapter("Qwen3-Next-80B-A3B-Instruct", str(source), False)
    skeleton = adapter.init_skeleton()
    for name in ENGINE_FLOAT["qwen3_next"]:
        assert isinstance(skeleton.get_submodule(name), EngineFloatLinear)
    assert isinstance(skeleton.get_submodule("model.layers.0.linear_attn.in_proj_qkvz"), torch.nn.Linear)
    assert isinstance(skeleton.get_submodule("model.layers.0.linear_attn.conv1d"), torch.nn.Conv1d)


def test_kimi_config_is_read_as_data_never_as_code(checkpoints, monkeypatch):
    source = checkpoints("kimi_k2")
    config = json.loads((source / "config.json").read_text())
    assert config["model_type"] == "kimi_k2" and "auto_map" in config
    (source / "configuration_deepseek.py").write_text("raise RuntimeError('checkpoint code ran')\n")
    adapter = create_adapter("Kimi-K2-Thinking", str(source), True)  # even when code is trusted
    assert type(adapter.config).__name__ == "DeepseekV3Config" and adapter.config.model_type == "kimi_k2"
    assert type(adapter.init_skeleton()).__name__ == "DeepseekV3ForCausalLM"


def test_unused_tensors_are_reported(checkpoints, tmp_path):
    """A checkpoint tensor no module reads (here an MTP layer's projection) is named, not silently dropped."""
    source = tmp_path / "glm"
    shutil.copytree(checkpoints("glm4_moe"), source)
    (weights,) = source.glob("*.safetensors")
    state = load_file(weights)
    state["model.layers.3.eh_proj.weight"] = torch.zeros(64, 128)
    save_file(state, weights, metadata={"format": "pt"})
    adapter = create_adapter("GLM-4.5", str(source), False)
    assert adapter.unused_checkpoint_tensors(adapter.init_skeleton()) == ["model.layers.3.eh_proj.weight"]


# ---- DeepSeek-V4 (model/deepseek_v4.py): DeepSeek's native names on disk, in the model and in the output ----------
V4 = "DeepSeek-V4-Flash"


def test_deepseek_v4_loads_its_native_checkpoint_exactly(checkpoints):
    source = checkpoints("deepseek_v4")
    stored = tensor_names(source)
    assert {"embed.weight", "head.weight", "norm.weight", "hc_head_fn", "layers.0.hc_attn_fn", "layers.0.ffn.gate.tid2eid",
            "layers.1.ffn.gate.bias", "layers.1.attn.indexer.compressor.ape", "layers.1.attn.indexer.wq_b.weight",
            "layers.2.attn.compressor.norm.weight", "layers.2.ffn.experts.3.w2.weight"} <= stored
    assert not any(n.startswith("model.") for n in stored)
    adapter = create_adapter(V4, str(source), False)
    model = adapter.init_model(torch.device("cpu"), load_layers=True)
    assert set(model.state_dict()) == stored, "the model's names are the checkpoint's"
    assert adapter.unused_checkpoint_tensors(adapter.init_skeleton()) == []
    ids = random_ids()
    expected = logits(float_reference(source, "deepseek_v4"), ids)  # transformers' own load of the native names
    assert expected.abs().max() > 0.1, "a degenerate tiny model would hide mistakes"
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-5, rtol=1e-5)
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {"layers.1.attn.wq_a", "layers.1.attn.wkv", "layers.1.attn.wq_b", "layers.1.attn.wo_b",
            "layers.1.attn.indexer.wq_b", "layers.1.ffn.experts.0.w1", "layers.1.ffn.shared_experts.w2"} <= linears
    # the engine runs these in float: never planned
    assert not {"layers.1.attn.wo_a", "layers.1.attn.compressor.wkv", "layers.1.attn.indexer.compressor.wgate",
                "layers.1.attn.indexer.weights_proj", "layers.2.attn.compressor.wgate"} & linears
    for expert in model.layers[1].ffn.experts:  # the swiglu clamp is part of the computation (before SiLU)
        assert expert.limit == model.config.swiglu_limit and expert.clamp_before_activation
        expert.limit = 0.05
    assert (logits(model, ids) - expected).abs().max() > 1e-3


def test_deepseek_v4_calibration_walks_the_blocks_as_the_model_does(checkpoints):
    """Block by block, with the token ids (hash-routed layers look their experts up by token) and the
    hyper-connection streams [batch, tokens, hc_mult, hidden] passed between blocks."""
    from msmodelslim.model.interface import block_hidden_state

    adapter = create_adapter(V4, str(checkpoints("deepseek_v4")), False)
    model = adapter.init_model(torch.device("cpu"), load_layers=True)
    ids = random_ids(seed=3)
    expected = logits(model, ids)
    walk = adapter.generate_model_forward(model, {"input_ids": ids})
    request = next(walk)
    with torch.no_grad():
        while True:
            output = request.module(*request.args, **request.kwargs)
            try:
                request = walk.send(output)
            except StopIteration:
                break
        got = model.head(model.norm(model.model.hc_head(block_hidden_state(output))))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_deepseek_v4_w8a8_dynamic_end_to_end(checkpoints, tmp_path, capsys):
    source = checkpoints("deepseek_v4")
    config = write_yaml(tmp_path / "w8a8.yaml", [W8A8_DYNAMIC])
    plan = quantize(QuantizeRequest(model_path=source, save_path=tmp_path / "dry", model_type=V4,
                                    device=DeviceSpec("cpu"), config_path=config, dry_run=True)).plan
    out = tmp_path / "out"
    code = main(["quant", "--model_path", str(source), "--save_path", str(out), "--device", "cpu",
                 "--model_type", V4, "--config_path", str(config)])
    assert code == 0, capsys.readouterr().err
    code = main(["check", str(out), "--model_path", str(source)])
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err
    description = json.loads((out / "quant_model_description.json").read_text())
    written = {k[: -len(".weight")]: v for k, v in description.items()
               if k.endswith(".weight") and k[: -len(".weight")] in plan}
    assert written == plan and set(plan.values()) == {"W8A8_DYNAMIC", "FLOAT"} and plan["head"] == "FLOAT"
    for name in ("embed", "head", "layers.1.attn.wo_a", "layers.1.attn.compressor.wkv",
                 "layers.1.attn.indexer.weights_proj", "layers.2.ffn.gate"):
        assert description[f"{name}.weight"] == "FLOAT", name
    for name in ("layers.1.attn.indexer.wq_b", "layers.0.ffn.experts.0.w1", "layers.2.ffn.shared_experts.w3"):
        assert description[f"{name}.weight"] == "W8A8_DYNAMIC", name
    assert description["hc_head_fn"] == "FLOAT" and description["layers.0.ffn.gate.tid2eid"] == "FLOAT"
    assert tensor_names(source) <= tensor_names(out), "every input tensor is written under its native name"
    ids = random_ids(seed=1)
    float_logits = logits(float_reference(source, "deepseek_v4"), ids)
    drift = ((logits(load_ascendv1(out), ids) - float_logits).norm() / float_logits.norm()).item()
    with capsys.disabled():
        print(f"\ndeepseek_v4 W8A8 dynamic: relative logit error vs float {drift:.3f}")
    assert drift < 0.3, f"quantized deepseek_v4 drifted {drift:.3f} from float"


E2M1_MAGNITUDES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def _as_release_format(source, tmp_path) -> tuple:
    """A copy of `source` in DeepSeek's release format for two weights: layer 0's wq_a float8 e4m3 with e8m0 block
    scales (blocks of 16 here, config.json's weight_block_size), layer 1's expert 0 w1 FP4 (two e2m1 codes a byte,
    low nibble first) with an e8m0 scale per 32 columns. Returns (copy, {weight name: the float it stands for})."""
    copy = tmp_path / "release"
    shutil.copytree(source, copy)
    (weights,) = copy.glob("*.safetensors")
    state, g = load_file(weights), torch.Generator().manual_seed(5)
    fp8, fp4 = "layers.0.attn.wq_a", "layers.1.ffn.experts.0.w1"
    rows, cols = state[f"{fp8}.weight"].shape
    exponents = torch.randint(120, 125, (rows // 16, cols // 16), generator=g, dtype=torch.uint8)
    scale = torch.pow(2.0, exponents.double() - 127).float().repeat_interleave(16, 0).repeat_interleave(16, 1)
    codes = (state[f"{fp8}.weight"].float() / scale).to(torch.float8_e4m3fn)
    expected = {f"{fp8}.weight": codes.float() * scale}
    state[f"{fp8}.weight"], state[f"{fp8}.scale"] = codes, exponents.view(torch.float8_e8m0fnu)
    rows, cols = state[f"{fp4}.weight"].shape
    nibbles = torch.randint(0, 16, (rows, cols), generator=g)
    exponents = torch.randint(122, 127, (rows, cols // 32), generator=g, dtype=torch.uint8)
    values = torch.tensor([(-1.0 if c >= 8 else 1.0) * E2M1_MAGNITUDES[c % 8] for c in nibbles.flatten().tolist()])
    expected[f"{fp4}.weight"] = values.reshape(rows, cols) * torch.pow(2.0, exponents.double() - 127).float() \
        .repeat_interleave(32, 1)
    state[f"{fp4}.weight"] = (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).to(torch.uint8).view(torch.int8)
    state[f"{fp4}.scale"] = exponents.view(torch.float8_e8m0fnu)
    save_file(state, weights, metadata={"format": "pt"})
    config = json.loads((copy / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                     "activation_scheme": "dynamic", "weight_block_size": [16, 16]}
    (copy / "config.json").write_text(json.dumps(config))
    return copy, expected


def test_deepseek_v4_release_format_is_dequantized_on_load(checkpoints, tmp_path, capsys):
    source, expected = _as_release_format(checkpoints("deepseek_v4"), tmp_path)
    adapter = create_adapter(V4, str(source), False)
    assert not any(n.endswith(".scale") for n in adapter.checkpoint.names())
    model = adapter.init_model(torch.device("cpu"), load_layers=True)
    state = model.state_dict()
    for name, weight in expected.items():
        torch.testing.assert_close(state[name], weight, atol=0, rtol=0)
    out = tmp_path / "out"
    assert main(["quant", "--model_path", str(source), "--save_path", str(out), "--device", "cpu",
                 "--model_type", V4, "--config_path", str(write_yaml(tmp_path / "w8a8.yaml", [W8A8_DYNAMIC]))]) == 0
    capsys.readouterr()
    assert main(["check", str(out), "--model_path", str(source)]) == 0, capsys.readouterr().out
    assert not any(n.endswith(".scale") for n in tensor_names(out))


def test_deepseek_v4_mtp_layer_is_written_through(checkpoints, tmp_path):
    """Without quarot the multi-token-prediction layer (`mtp.*`, not built) reaches the output unchanged (its
    rotation under quarot: tests/test_family_transforms.py)."""
    source = tmp_path / "with_mtp"
    shutil.copytree(checkpoints("deepseek_v4"), source)
    (weights,) = source.glob("*.safetensors")
    mtp = {"mtp.0.e_proj.weight": torch.randn(64, 64), "mtp.0.enorm.weight": torch.ones(64)}
    save_file({**load_file(weights), **mtp}, weights, metadata={"format": "pt"})
    out = tmp_path / "out"
    assert main(["quant", "--model_path", str(source), "--save_path", str(out), "--device", "cpu",
                 "--model_type", V4, "--config_path", str(write_yaml(tmp_path / "w8a8.yaml", [W8A8_DYNAMIC]))]) == 0
    written = {}
    for shard in out.glob("*.safetensors"):
        written.update(load_file(shard))
    assert all(torch.equal(written[k], v) for k, v in mtp.items())


def test_step35_names_and_clamped_experts(checkpoints):
    source = checkpoints("step3p5")
    stored = tensor_names(source)
    assert "model.layers.1.moe.gate_proj.weight" in stored and "model.layers.1.moe.experts.0.gate_proj.weight" not in stored
    model = create_adapter("Step-3.5-Flash", str(source), False).init_model(torch.device("cpu"), load_layers=True)
    names = set(model.state_dict())
    assert {"model.layers.2.moe.router_bias", "model.layers.2.moe.gate.weight",
            "model.layers.2.moe.share_expert.up_proj.weight", "model.layers.0.mlp.up_proj.weight"} <= names
    assert not any(".mlp.gate." in n or "e_score_correction_bias" in n for n in names)
    layer = model.model.layers[2]
    assert torch.equal(layer.moe.gate.e_score_correction_bias, layer.moe.router_bias)  # the router reads it there
    assert model.model.layers[1].self_attn.q_proj.out_features == 8 * 16  # a sliding layer's own head count
    ids = random_ids()
    expected = logits(float_reference(source, "step3p5"), ids)
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-5, rtol=1e-5)
    for expert in layer.moe.experts:  # the swiglu clamp (limit 0.3 in layer 2) is part of the computation
        assert expert.limit == 0.3
        expert.limit = None
    assert (logits(model, ids) - expected).abs().max() > 1e-2


@pytest.mark.parametrize("change,needle", [
    ({"att_impl_type": "MLA"}, "att_impl_type 'MLA'"),
    ({"attention_other_setting": {"attention_type": "sliding_attention", "num_attention_heads": 8,
                                  "num_attention_groups": 4, "head_dim": 16}},
     "attention_other_setting.num_attention_groups 4 differs"),
    ({"use_rope_layers": [True, False, True]}, "use_rope_layers turns RoPE off"),
])
def test_step35_configs_transformers_cannot_express_are_refused(checkpoints, tmp_path, monkeypatch, change, needle):
    copy = tmp_path / "m"
    shutil.copytree(checkpoints("step3p5"), copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, **change}))
    monkeypatch.setattr("msmodelslim.model.checkpoint.SafetensorsCheckpoint.__init__",
                        lambda *a, **k: pytest.fail("a checkpoint was opened"))
    with pytest.raises(UnsupportedError, match=needle + ".*Nothing was read"):
        create_adapter("Step-3.5-Flash", str(copy), False)


def test_minimax_w4a8_experts_take_the_scale_bias_layout_of_their_role(checkpoints, tmp_path):
    """w2 is the experts' down projection (row role: scale_bias [H, 16]); w1/w3 gate and up ([I, 1])."""
    source = checkpoints("minimax_m2")
    process = [{"type": "linear_quant", "qconfig": SCHEMES["w4a8_dynamic"], "include": ["*block_sparse_moe.experts*"]},
               {"type": "linear_quant", "qconfig": SCHEMES["w8a8_dynamic"], "include": ["*self_attn*"]}]
    out = tmp_path / "out"
    report = quantize(QuantizeRequest(model_path=source, save_path=out, model_type="MiniMax-M2.7",
                                      device=DeviceSpec("cpu"), config_path=write_yaml(tmp_path / "c.yaml", process)))
    assert report.warnings == []  # experts: no dense-W4A8 warning
    expert = "model.layers.1.block_sparse_moe.experts.2"
    assert read_tensor(out, f"{expert}.w2.scale_bias").shape == (64, 16)
    assert read_tensor(out, f"{expert}.w1.scale_bias").shape == read_tensor(out, f"{expert}.w3.scale_bias").shape == (32, 1)
    ids = random_ids()
    float_logits = logits(float_reference(source, "minimax_m2"), ids)
    drift = ((logits(load_ascendv1(out), ids) - float_logits).norm() / float_logits.norm()).item()
    assert drift < 0.3, f"drifted {drift:.3f}"


@pytest.mark.parametrize("family", FAMILIES)
def test_calibration_walks_the_blocks_as_the_model_does(checkpoints, family):
    """The block-by-block forward calibration runs reproduces the model's own forward (Step-3.5's sliding layers
    and Qwen3-Next's linear-attention layers get their own masks and rotary tables)."""
    from msmodelslim.model.interface import block_hidden_state

    adapter = create_adapter(MODEL_TYPE[family], str(checkpoints(family)), False)
    model = adapter.init_model(torch.device("cpu"), load_layers=True)
    ids = random_ids(seed=3)
    expected = logits(model, ids)
    walk = adapter.generate_model_forward(model, {"input_ids": ids})
    request = next(walk)
    with torch.no_grad():
        while True:
            output = request.module(*request.args, **request.kwargs)
            try:
                request = walk.send(output)
            except StopIteration:
                break
        got = model.lm_head(model.model.norm(block_hidden_state(output)))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["step3p5", "qwen3_next", "glm_moe_dsa"])
def test_static_attention_calibrated_through_the_blocks(checkpoints, tmp_path, family):
    """Static W8A8 (calibrated input ranges) on the attention, dynamic experts: the ranges come from the walk
    above; the checkpoint passes the checklist and reads back close to float."""
    from helpers import small_calib

    source = checkpoints(family)
    attention = {"step3p5": ["*self_attn.q_proj", "*self_attn.k_proj", "*self_attn.v_proj"],  # fused: one scale
                 "qwen3_next": ["*linear_attn.in_proj_qkvz"],
                 "glm_moe_dsa": ["*self_attn.q_a_proj", "*self_attn.kv_a_proj_with_mqa"]}[family]
    process = [{"type": "linear_quant", "qconfig": SCHEMES["w8a8_static"], "include": attention},
               {"type": "linear_quant", "qconfig": SCHEMES["w8a8_dynamic"], "include": ["*.experts.*"]}]
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"apiversion": "modelslim_v1", "spec": {
        "runner": "layer_wise", "dataset": small_calib(tmp_path), "process": process}}))
    out = tmp_path / "out"
    quantize(QuantizeRequest(model_path=source, save_path=out, model_type=MODEL_TYPE[family],
                             device=DeviceSpec("cpu"), config_path=config))
    description = json.loads((out / "quant_model_description.json").read_text())
    assert "W8A8" in description.values()
    float_model, ours = float_reference(source, family), load_ascendv1(out)
    if family in DSA:
        for model in (float_model, ours):
            all_keys(model)
    ids = random_ids(seed=4)
    float_logits = logits(float_model, ids)
    drift = ((logits(ours, ids) - float_logits).norm() / float_logits.norm()).item()
    # static ranges from 6 short texts, probed with random tokens: some clipping is expected
    assert drift < 0.25, f"drifted {drift:.3f}"
