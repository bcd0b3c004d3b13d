"""svd_res (SVDQuant's low-rank residual, processor/svd_res): the split against a slow reference SVD, exactness in
float, the _SVD layers through ascendv1, both readers and the checker, the refusals, and the SVDQuant recipe
(iter_smooth -> svd_res -> W4A4 MXFP4) against the same recipe without the split."""
import json

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from helpers import MODEL_TYPE, SCHEMES, outputs_of_both_runners, quantize_variants, run_quant, shard_bytes, small_calib
from msmodelslim.core.device import DeviceSpec
from msmodelslim.app.convert import convert_ascendv1_to_compressed_tensors
from msmodelslim.core.config import parse_config
from msmodelslim.core.errors import ConfigError, UnsupportedError
from msmodelslim.core.roadmap import not_yet
from msmodelslim.format.ascendv1.checker import check_ascendv1
from msmodelslim.format.ascendv1.reader import load_ascendv1
from msmodelslim.format.ascendv1.tensors import split_svd_tag, svd_tag
from msmodelslim.ir.lowrank import LowRankResidualLinear
from msmodelslim.ir.quant_linear import QuantLinear
from msmodelslim.processor.base import ProcessorContext
from msmodelslim.processor.linear_quant.config import LinearQuantConfig
from msmodelslim.processor.svd_res.config import SvdResConfig
from msmodelslim.processor.svd_res.processor import SvdResProcessor, svd_split
from reference_reader import load_reference_model

MXFP4 = {"dtype": "mxfp4", "scope": "per_block", "symmetric": True, "method": "minmax"}
W4A4_MXFP4 = {"act": MXFP4, "weight": MXFP4}
TOKENS = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))


def write_pipeline(path, process, runner="layer_wise", dataset=None, saver="ascendv1_saver"):
    spec = {"runner": runner, "process": process, "save": [{"type": saver}]}
    if dataset:
        spec["dataset"] = dataset
    path.write_text(yaml.safe_dump({"apiversion": "modelslim_v1", "spec": spec}))
    return path


def svd_step(rank=8, **extra):
    return {"type": "svd_res", "rank": rank, **extra}


def quant_step(qconfig):
    return {"type": "linear_quant", "qconfig": qconfig, "exclude": ["lm_head"]}


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits.float()


def test_tags():
    assert svd_tag("W4A4_MXFP4") == "W4A4_MXFP4_SVD"
    assert svd_tag("W8A8_DYNAMIC") == "W8A8_SVD_DYNAMIC"
    assert svd_tag("W8A8FP8_DYNAMIC") == "W8A8FP8_SVD_DYNAMIC"
    for tag in ("W4A4_MXFP4", "W8A8_DYNAMIC", "W8A8", "W4A16", "W8A8FP8_DYNAMIC"):
        assert split_svd_tag(svd_tag(tag)) == (tag, True)
        assert split_svd_tag(tag) == (tag, False)


@pytest.mark.parametrize("shape,rank", [((48, 80), 8), ((80, 48), 48), ((32, 32), 1)])
def test_split_matches_a_float64_numpy_svd(shape, rank):
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    weight[:, 3] *= 20  # an outlier input channel, what smoothing leaves in the weights
    residual, l1, l2 = svd_split(weight, rank)
    assert list(l1.shape) == [rank, shape[1]] and list(l2.shape) == [shape[0], rank]
    u, s, vh = np.linalg.svd(weight.double().numpy(), full_matrices=False)
    best = (u[:, :rank] * s[:rank]) @ vh[:rank]  # Eckart–Young: the best rank-r approximation
    product = (l2.double() @ l1.double()).numpy()
    scale = np.abs(best).max()
    assert np.abs(product - best).max() <= 1e-5 * scale
    assert np.abs(residual.double().numpy() - (weight.double().numpy() - best)).max() <= 1e-5 * scale
    assert torch.allclose(l1 @ l1.T, torch.eye(rank), atol=1e-5)  # l1 = Vᵣᵀ has orthonormal rows
    tail = float(np.sqrt((s[rank:] ** 2).sum()))
    assert abs(float(residual.double().norm()) - tail) <= 1e-5 * float(np.linalg.norm(s))


def spectrum_matrix(out, inp, decay, seed=2) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight with singular values 1/(1+i)^decay (0: flat, like a random matrix) and random singular vectors."""
    g = torch.Generator().manual_seed(seed)
    n = min(out, inp)
    u = torch.linalg.qr(torch.randn(out, n, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(inp, n, generator=g, dtype=torch.float64)).Q
    s = 1.0 / (1 + torch.arange(n, dtype=torch.float64)) ** decay
    return ((u * s) @ v.T).float(), s


@pytest.mark.parametrize("shape", [(300, 700), (700, 300)])
def test_large_layers_use_subspace_iteration_and_find_the_best_split(shape):
    """min(out, in) > 4·(rank + 32): subspace iteration. With a spectrum gap it finds the exact top-r pair; on a
    flat spectrum (no gap, any near-top subspace will do) its error stays within 0.1 % of the optimum."""
    weight, s = spectrum_matrix(*shape, decay=1.0)
    residual, l1, l2 = svd_split(weight, 8)
    u, sv, vh = np.linalg.svd(weight.double().numpy(), full_matrices=False)
    best = (u[:, :8] * sv[:8]) @ vh[:8]
    assert np.abs((l2.double() @ l1.double()).numpy() - best).max() <= 1e-5 * np.abs(best).max()
    flat = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    residual, _, _ = svd_split(flat, 8)
    optimum = float(torch.linalg.svdvals(flat.double())[8:].norm())
    ratio = float(residual.double().norm()) / optimum
    print(f"{shape} flat spectrum: |R| / optimum = {ratio:.6f}")
    assert 1 - 1e-6 <= ratio <= 1.001


def test_split_does_not_depend_on_the_thread_count():
    """dp_layer_wise ranks run with fewer threads than one process: the same bytes either way."""
    weight, _ = spectrum_matrix(300, 700, decay=0.5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = svd_split(weight, 8)
        torch.set_num_threads(max(2, threads))
        many = svd_split(weight, 8)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, many))


def test_split_refuses_a_rank_beyond_the_layer():
    with pytest.raises(ValueError, match=r"rank 33 is outside 1..min\(out, in\) = 32"):
        svd_split(torch.randn(32, 64), 33)


def test_svd_res_alone_is_exact_in_float(tiny_llama):
    """Every decoder linear split (rank 8), nothing quantized: the logits are the float model's up to rounding."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    before = logits(model)
    everything = LinearQuantConfig(type="linear_quant", qconfig=W4A4_MXFP4, exclude=["lm_head"])
    processor = SvdResProcessor(SvdResConfig(type="svd_res", rank=8), ProcessorContext(following=(everything,)))
    for i, layer in enumerate(model.model.layers):
        processor.after_forward(f"model.layers.{i}", layer)
    split = [m for m in model.model.layers.modules() if isinstance(m, LowRankResidualLinear)]
    assert len(split) == 7 * len(model.model.layers)
    after = logits(model)
    delta = float((after - before).abs().max())
    print(f"svd_res alone: max |Δlogit| = {delta:.3e} (logits up to {float(before.abs().max()):.2f})")
    assert delta <= 1e-4 * float(before.abs().max())
    for module in split:  # and folding the pair back gives W again (a split layer written as FLOAT)
        assert module.rank == 8


def test_split_layer_folds_back_to_its_weight():
    weight, bias = torch.randn(24, 40), torch.randn(24)
    residual, l1, l2 = svd_split(weight, 5)
    module = LowRankResidualLinear(residual, bias, l1, l2)
    assert torch.allclose(module.folded_weight(), weight, atol=1e-5)
    x = torch.randn(3, 40)
    assert torch.allclose(module(x), x @ weight.T + bias, atol=1e-5)


def test_svd_res_without_quantization_leaves_the_layers_float(tiny_llama, tmp_path):
    """No later rule quantizes them: svd_res splits nothing and the output's weights are the model's own."""
    out = tmp_path / "out"
    report = run_quant(tiny_llama, out, write_pipeline(tmp_path / "c.yaml", [svd_step()]), MODEL_TYPE["llama"])
    assert set(report.plan.values()) == {"FLOAT"}
    description = json.loads((out / "quant_model_description.json").read_text())
    assert not [k for k in description if "svd_lowrank" in k]
    with safe_open(next(tiny_llama.glob("*.safetensors")), framework="pt") as f:
        source = {k: f.get_tensor(k) for k in f.keys()}
    with safe_open(next(out.glob("quant_model_weights*.safetensors")), framework="pt") as f:
        for key in f.keys():
            if key in source:
                assert torch.equal(f.get_tensor(key), source[key]), key


# (fixture, family, qconfig, written tag, group_size, the pair's dtype on disk: the model's)
ROUND_TRIP = [("tiny_llama", "llama", W4A4_MXFP4, "W4A4_MXFP4_SVD", 32, torch.float32),
              ("tiny_qwen2", "qwen2", SCHEMES["w8a8_dynamic"], "W8A8_SVD_DYNAMIC", 0, torch.float32),
              ("tiny_qwen3_bf16_tied", "qwen3", W4A4_MXFP4, "W4A4_MXFP4_SVD", 32, torch.bfloat16)]


@pytest.mark.parametrize("fixture,family,qconfig,tag,group_size,pair_dtype", ROUND_TRIP)
def test_round_trip_through_both_readers(request, tmp_path, fixture, family, qconfig, tag, group_size, pair_dtype):
    source = request.getfixturevalue(fixture)
    out = tmp_path / "out"
    config = write_pipeline(tmp_path / "c.yaml", [svd_step(8), quant_step(qconfig)])
    dry = run_quant(source, tmp_path / "dry", config, MODEL_TYPE[family], dry_run=True)
    report = run_quant(source, out, config, MODEL_TYPE[family])
    assert dry.plan == report.plan
    assert set(report.plan.values()) == {tag, "FLOAT"}
    description = json.loads((out / "quant_model_description.json").read_text())
    for name, planned in report.plan.items():  # the plan shows the tags exactly as written
        assert description[f"{name}.weight"] == planned
        if planned != "FLOAT":
            assert description[f"{name}.svd_lowrank_l1"] == description[f"{name}.svd_lowrank_l2"] == "FLOAT"
    assert description["model_quant_type"] == ("W4A4_MXFP4_SVD" if tag == "W4A4_MXFP4_SVD" else "FLOAT")
    assert description["group_size"] == group_size
    with safe_open(next(out.glob("quant_model_weights*.safetensors")), framework="pt") as f:
        pairs = [f.get_tensor(k) for k in f.keys() if "svd_lowrank" in k]
    assert pairs and {t.dtype for t in pairs} == {pair_dtype}
    findings = check_ascendv1(out)
    assert [f.message for f in findings if f.level == "error"] == []
    warnings = [f.message for f in findings if f.level == "warning"]
    assert any(tag in w and "_SVD" in w and "does not load" in w for w in warnings), warnings
    assert any("_SVD" in w for w in report.warnings), report.warnings

    original = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    ours, reference = load_ascendv1(out), load_reference_model(out)
    quantized = {n: m for n, m in ours.named_modules() if isinstance(m, QuantLinear)}
    assert len(quantized) == sum(1 for v in report.plan.values() if v != "FLOAT") > 0
    for name, module in quantized.items():  # the pair written is the rank-8 SVD of the original weight
        assert module.svd_rank == 8
        weight = original.get_submodule(name).weight.detach().double()
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        best = (u[:, :8] * s[:8]) @ vh[:8]
        pair = module.svd_lowrank_l2.double() @ module.svd_lowrank_l1.double()
        rounding = 1e-4 if pair_dtype == torch.float32 else 1e-2  # float32 SVD; bf16 factors on disk
        assert float((pair - best).abs().max()) <= rounding * float(weight.abs().max()), name
    ours_logits, reference_logits, float_logits = logits(ours), logits(reference), logits(original)
    disagreement = float((ours_logits - reference_logits).abs().max())
    drift = float((ours_logits - float_logits).norm() / float_logits.norm())
    print(f"{family} {tag}: readers disagree by {disagreement:.2e}; relative logit error vs float {drift:.4f}")
    assert disagreement <= 1e-4
    assert drift < 0.6


def test_layer_wise_and_model_wise_write_the_same_bytes(tiny_llama, tmp_path):
    layer_wise, model_wise = outputs_of_both_runners(tiny_llama, tmp_path, [svd_step(8), quant_step(W4A4_MXFP4)],
                                                     MODEL_TYPE["llama"])
    assert layer_wise and layer_wise == model_wise


def test_rank_beyond_a_layer_is_refused_before_any_weight_is_read(tiny_llama, tmp_path):
    config = write_pipeline(tmp_path / "c.yaml", [svd_step(33), quant_step(W4A4_MXFP4)])
    with pytest.raises(ConfigError, match=r"svd_res rank 33 exceeds min\(out, in\) = 32 of layer "
                                          r"model\.layers\.0\.self_attn\.k_proj \[32, 64\].*rank <= 32"):
        run_quant(tiny_llama, tmp_path / "out", config, MODEL_TYPE["llama"])
    assert not (tmp_path / "out").exists()
    # excluding the narrow layers alone would split q/k/v, which the engine fuses, between W4A4_MXFP4_SVD and
    # W4A4_MXFP4: refused from the plan too
    narrow = ["*k_proj", "*v_proj"]
    config = write_pipeline(tmp_path / "c2.yaml", [svd_step(33, exclude=narrow), quant_step(W4A4_MXFP4)])
    with pytest.raises(UnsupportedError, match=r"fuses into one would get different schemes \(model\.layers\.0\."
                                               r"self_attn\.q_proj W4A4_MXFP4_SVD"):
        run_quant(tiny_llama, tmp_path / "dry", config, MODEL_TYPE["llama"], dry_run=True)
    # excluding the whole fused group makes rank 33 valid for the rest (64 x 64 and wider)
    config = write_pipeline(tmp_path / "c3.yaml", [svd_step(33, exclude=["*q_proj", *narrow]), quant_step(W4A4_MXFP4)])
    report = run_quant(tiny_llama, tmp_path / "dry", config, MODEL_TYPE["llama"], dry_run=True)
    assert report.plan["model.layers.0.self_attn.k_proj"] == "W4A4_MXFP4"
    assert report.plan["model.layers.0.self_attn.q_proj"] == "W4A4_MXFP4"
    assert report.plan["model.layers.0.self_attn.o_proj"] == "W4A4_MXFP4_SVD"


def test_compressed_tensors_refuses_svd_res_before_any_weight_is_read(tiny_llama, tmp_path):
    config = write_pipeline(tmp_path / "c.yaml", [svd_step(8), quant_step(SCHEMES["w8a8_dynamic"])],
                            saver="compressed_tensors")
    with pytest.raises(UnsupportedError, match="svd_res cannot be saved as compressed_tensors: vLLM has no "
                                               "compressed-tensors scheme"):
        run_quant(tiny_llama, tmp_path / "out", config, MODEL_TYPE["llama"])
    assert not (tmp_path / "out").exists()
    # nor converted from ascendv1: the pair would be dropped
    ascend = tmp_path / "ascend"
    process = [svd_step(8), quant_step(SCHEMES["w8a8_dynamic"])]
    run_quant(tiny_llama, ascend, write_pipeline(tmp_path / "a.yaml", process), MODEL_TYPE["llama"])
    with pytest.raises(UnsupportedError, match="holds W8A8_SVD_DYNAMIC layers .*vLLM has no compressed-tensors scheme"):
        convert_ascendv1_to_compressed_tensors(ascend, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def spec_error(process) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config({"apiversion": "modelslim_v1", "spec": {"process": process}})
    return str(info.value)


def test_config_fields_and_order():
    assert not_yet("processor", "svd_res") is None
    config = parse_config({"apiversion": "modelslim_v1", "spec": {"process": [{"type": "svd_res"}]}})
    step = config.spec.process[0]
    assert (step.rank, step.include, step.exclude) == (32, ["*"], [])
    assert "rank" in spec_error([{"type": "svd_res", "rank": 0}])
    assert "spec.process[0].alpha: unknown key" in spec_error([{"type": "svd_res", "alpha": 0.5}])
    message = spec_error([quant_step(W4A4_MXFP4), svd_step()])
    assert "process[1] (svd_res) comes after process[0]" in message
    message = spec_error([svd_step(), {"type": "iter_smooth"}, quant_step(W4A4_MXFP4)])
    assert "process[1] (iter_smooth) comes after svd_res (process[0])" in message


def relative_logit_error(source, out) -> float:
    original = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    reference, quantized = logits(original), logits(load_ascendv1(out))
    return float((quantized - reference).norm() / reference.norm())


def test_svdquant_recipe_beats_the_same_recipe_without_the_split(tiny_llama, tmp_path):
    """iter_smooth -> svd_res -> linear_quant W4A4 MXFP4 (the established SVDQuant recipe) end to end, against
    iter_smooth -> linear_quant W4A4 MXFP4 on the same model and data."""
    dataset = small_calib(tmp_path)
    smooth = {"type": "iter_smooth", "alpha": 0.9}
    errors = {}
    for name, process in {"without": [smooth, quant_step(W4A4_MXFP4)],
                          "with": [smooth, svd_step(16), quant_step(W4A4_MXFP4)]}.items():
        out = tmp_path / name
        report = run_quant(tiny_llama, out, write_pipeline(tmp_path / f"{name}.yaml", process, dataset=dataset),
                           MODEL_TYPE["llama"])
        assert set(report.plan.values()) == {"W4A4_MXFP4_SVD" if name == "with" else "W4A4_MXFP4", "FLOAT"}
        assert [f.message for f in check_ascendv1(out) if f.level == "error"] == []
        errors[name] = relative_logit_error(tiny_llama, out)
    print(f"W4A4 MXFP4 relative logit error vs float: iter_smooth {errors['without']:.4f}, "
          f"iter_smooth + svd_res(16) {errors['with']:.4f}")
    assert errors["with"] < errors["without"]


def test_two_cpu_ranks_write_the_single_process_bytes(tiny_llama, tmp_path):
    """dp_layer_wise: svd_res merges nothing, every rank splits the same weights (iter_smooth's max statistics
    merge exactly), so the SVDQuant recipe's bytes equal one process's."""
    process = [{"type": "iter_smooth", "alpha": 0.9}, svd_step(8), quant_step(W4A4_MXFP4)]
    outs = quantize_variants(tiny_llama, tmp_path, process, MODEL_TYPE["llama"],
                             {"single": ("auto", DeviceSpec("cpu")), "dp": ("auto", DeviceSpec("cpu", (0, 1)))})
    single, dp = (shard_bytes(out) for out in outs.values())
    assert single and single == dp
    assert json.loads((outs["dp"] / "quant_model_description.json").read_text())["model_quant_type"] == "W4A4_MXFP4_SVD"


W4_G16_AUTOROUND = {"dtype": "int4", "scope": "per_group", "symmetric": True, "method": "autoround",
                    "ext": {"group_size": 16, "scale_dtype": "float32"}}


def test_autoround_quantizes_the_residual_and_carries_the_pair(tiny_llama, tmp_path):
    """svd_res -> autoround_quant (weight-only W4A16, tuned on R): W4A16_SVD layers both readers agree on."""
    process = [svd_step(8), {"type": "autoround_quant", "iters": 5,
                             "strategies": [{"qconfig": {"weight": W4_G16_AUTOROUND}, "exclude": ["lm_head"]}]}]
    out = tmp_path / "out"
    report = run_quant(tiny_llama, out, write_pipeline(tmp_path / "c.yaml", process, dataset=small_calib(tmp_path)),
                       MODEL_TYPE["llama"])
    assert set(report.plan.values()) == {"W4A16_SVD", "FLOAT"}
    description = json.loads((out / "quant_model_description.json").read_text())
    assert description["model.layers.0.mlp.down_proj.weight_packed"] == "W4A16_SVD"
    assert description["model.layers.0.mlp.down_proj.svd_lowrank_l1"] == "FLOAT"
    assert [f.message for f in check_ascendv1(out) if f.level == "error"] == []
    disagreement = float((logits(load_ascendv1(out)) - logits(load_reference_model(out))).abs().max())
    assert disagreement <= 1e-4


def rewrite(out, drop=(), replace=None):
    """The checkpoint with tensors dropped (and their description entries) or replaced."""
    from safetensors.torch import load_file, save_file

    shard = next(out.glob("quant_model_weights*.safetensors"))
    tensors = load_file(shard)
    description = json.loads((out / "quant_model_description.json").read_text())
    for name in drop:
        tensors.pop(name)
        description.pop(name)
    tensors.update(replace or {})
    save_file(tensors, shard)
    index = out / "quant_model_weights.safetensors.index.json"
    if index.exists():
        mapping = json.loads(index.read_text())
        mapping["weight_map"] = {k: v for k, v in mapping["weight_map"].items() if k not in drop}
        index.write_text(json.dumps(mapping))
    (out / "quant_model_description.json").write_text(json.dumps(description))


def test_checker_and_reader_name_a_broken_pair(tiny_llama, tmp_path):
    out = tmp_path / "out"
    run_quant(tiny_llama, out, write_pipeline(tmp_path / "c.yaml", [svd_step(8), quant_step(W4A4_MXFP4)]),
              MODEL_TYPE["llama"])
    layer = "model.layers.1.self_attn.o_proj"
    rewrite(out, replace={f"{layer}.svd_lowrank_l2": torch.zeros(64, 7)})
    errors = [f.message for f in check_ascendv1(out) if f.level == "error"]
    assert errors == [f"{layer}: 'svd_lowrank_l1' [8, 64] and 'svd_lowrank_l2' [64, 7] must be [r, 64] and [64, r]"]
    with pytest.raises(Exception, match=f"quantized layer {layer} \\(W4A4_MXFP4_SVD\\) has inconsistent tensors"):
        load_ascendv1(out)
    rewrite(out, drop=[f"{layer}.svd_lowrank_l2"])
    errors = [f.message for f in check_ascendv1(out) if f.level == "error"]
    assert errors == [f"{layer}: W4A4_MXFP4_SVD type needs tensor(s) 'svd_lowrank_l2'"]
    with pytest.raises(Exception, match=f"quantized layer {layer} \\(W4A4_MXFP4_SVD\\) lacks tensor\\(s\\) "
                                        f"{layer}.svd_lowrank_l2"):
        load_ascendv1(out)


def test_in_a_group_with_its_quantizer_it_writes_what_two_steps_write(tiny_llama, tmp_path):
    """group [svd_res, linear_quant W8A8 static]: one calibration forward, taken before the split; as two steps the
    forward runs on the split layers, whose outputs differ from the original's only by float rounding. So the
    static ranges agree to rounding and the checkpoints compute the same logits (float32 forwards: in bfloat16 the
    two roundings differ by bfloat16's, which is not what is compared here)."""
    steps = [svd_step(8), quant_step(SCHEMES["w8a8_static"])]
    outs = {}
    for name, process in {"steps": steps, "group": [{"type": "group", "configs": steps}]}.items():
        (tmp_path / name).mkdir()
        outs[name] = quantize_variants(tiny_llama, tmp_path / name, process, MODEL_TYPE["llama"],
                                       {"out": ("layer_wise", DeviceSpec("cpu"))},
                                       calibration={"precision": "float32"})["out"]
    description = json.loads((outs["group"] / "quant_model_description.json").read_text())
    assert description["model.layers.0.self_attn.q_proj.weight"] == "W8A8_SVD"
    from safetensors.torch import load_file

    steps_t, group_t = (load_file(next(outs[n].glob("*.safetensors"))) for n in ("steps", "group"))
    assert steps_t.keys() == group_t.keys()
    for key in steps_t:
        if key.endswith(("input_scale", "svd_lowrank_l1", "svd_lowrank_l2")):
            assert torch.allclose(steps_t[key], group_t[key], rtol=1e-5, atol=0), key
    delta = float((logits(load_ascendv1(outs["steps"])) - logits(load_ascendv1(outs["group"]))).abs().max())
    print(f"group vs two steps: max |Δlogit| = {delta:.2e}")
    assert delta <= 1e-3
