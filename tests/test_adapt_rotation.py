"""adapt_rotation (QuaRot with a rotation learned in a spec.prior stage): the Procrustes step against a brute-force
search, the learning loop, the row sampler, the config protocol (stages where they run, keys of the other stage),
and whole runs: float outputs unchanged, the saved rotation the learned one, both runners identical, a killed run
resumed to identical bytes, refusals before any weight is read."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from helpers import SCHEMES, run_quant, small_calib
from test_quarot import with_norm_weights  # norm gains far from 1: a gain kept in stage 1's rows would show
from msmodelslim.core.config import parse_config
from msmodelslim.core.errors import ConfigError, InvalidDatasetError, UnsupportedError
from msmodelslim.core.resume import INTERVAL_ENV
from msmodelslim.format.ascendv1.reader import load_ascendv1
from msmodelslim.processor.adapt_rotation.learn import (learn_rotation, polar_factor, procrustes_step,
                                                        quantization_error)
from msmodelslim.processor.adapt_rotation.processor import starting_rotation
from msmodelslim.processor.sampling import ThinnedRowSample
from msmodelslim.quantizer.primitives import quantize_per_token_dynamic
from tiny_models import make_tiny_model

STAGE_1 = {"type": "adapt_rotation", "stage": 1, "steps": 6}
STAGE_2 = {"type": "adapt_rotation", "stage": 2}
W4A4 = {"type": "linear_quant", "qconfig": {"act": {"dtype": "int4", "scope": "per_token", "symmetric": True,
                                                    "method": "minmax"},
                                            "weight": {"dtype": "int4", "scope": "per_channel", "symmetric": True,
                                                       "method": "minmax"}},
        "exclude": ["lm_head"]}


def outlier_rows(tokens: int = 2048, width: int = 32, seed: int = 0) -> torch.Tensor:
    """Rows with channels of very different scales and one outlier channel, as LLM activations have."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, width, generator=g) * torch.exp(torch.randn(width, generator=g))
    x[:, 3] *= 25
    return x


# ---- the math ----------------------------------------------------------------------------------------------------

def test_the_polar_factor_beats_every_rotation_of_a_brute_force_search():
    """In 2-D every rotation and reflection is R(θ) or R(θ)·diag(1, −1): scanning θ finely bounds the optimum of
    ‖A·R − B‖ from above, and the polar factor must reach it."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(200, 2, generator=g, dtype=torch.float64)
    b = a @ torch.tensor([[0.6, -0.8], [0.8, 0.6]], dtype=torch.float64) + 0.3 * torch.randn(200, 2, generator=g,
                                                                                           dtype=torch.float64)
    r = polar_factor(a.T @ b)
    ours = float((a @ r - b).norm())
    best = math.inf
    for i in range(20000):
        t = 2 * math.pi * i / 20000
        rot = torch.tensor([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]], dtype=torch.float64)
        for cand in (rot, rot @ torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64))):
            best = min(best, float((a @ cand - b).norm()))
    assert torch.allclose(r @ r.T, torch.eye(2, dtype=torch.float64), atol=1e-12)
    assert ours <= best + 1e-9 and ours >= best - 1e-3


def test_the_procrustes_step_lowers_the_distance_to_the_fixed_codes():
    """Step 2 alone: with B = quant(X·Q) fixed, X·Q·R is no farther from B than X·Q was (R = I is a candidate)."""
    x = outlier_rows()
    q = starting_rotation(32, -1, 0).float()
    b = quantize_per_token_dynamic(x @ q, 4)
    stepped = procrustes_step(x, q, 4, 32)
    assert float((x @ stepped - b).norm()) <= float((x @ q - b).norm()) + 1e-4


@pytest.mark.parametrize("block,gain", [(32, 0.97), (8, 0.99)])  # smaller blocks leave less room to gain
def test_learning_lowers_the_per_token_error_and_keeps_the_rotation_orthogonal_and_block_diagonal(block, gain):
    x = outlier_rows()
    start = starting_rotation(32, -1 if block == 32 else block, 0)
    learned = learn_rotation(x, start, 4, 15, block)
    q = learned.rotation
    assert torch.allclose(q @ q.T, torch.eye(32, dtype=torch.float64), atol=1e-12)
    assert learned.best_step > 0 and learned.errors[learned.best_step] < gain * learned.errors[0]
    assert learned.errors[learned.best_step] == min(learned.errors)
    assert quantization_error(x, q.float(), 4) == pytest.approx(learned.errors[learned.best_step], rel=1e-3)
    mask = torch.block_diag(*[torch.ones(block, block)] * (32 // block)).bool()
    assert not q[~mask].any()


def test_int8_learning_is_asked_for_int8_errors():
    x = outlier_rows()
    start = starting_rotation(32, -1, 0)
    int8 = learn_rotation(x, start, 8, 4, 32)
    assert int8.errors[0] == pytest.approx(quantization_error(x, start.float(), 8), rel=1e-6)
    assert int8.errors[0] < 0.01 * learn_rotation(x, start, 4, 1, 32).errors[0]


def test_the_thinned_sample_keeps_evenly_spaced_tokens_within_its_bound():
    everything = torch.arange(0, 1000 * 3, dtype=torch.float32).reshape(1000, 3)
    sample = ThinnedRowSample(limit=50)
    for batch in torch.split(everything, [7, 130, 1, 400, 62, 400]):
        sample.add(batch.unsqueeze(0))
        assert sum(len(r) for r in sample.rows) <= 100
    kept = torch.cat(sample.rows)
    tokens = (kept[:, 0] / 3).long()
    assert torch.equal(tokens, torch.arange(0, 1000, sample.stride))  # every stride-th token, none else
    taken = sample.take()
    assert len(taken) == 50 and int(taken[0, 0]) == 0


# ---- the config protocol ----------------------------------------------------------------------------------------

def spec(**fields) -> dict:
    return {"apiversion": "modelslim_v1", "spec": fields}


def error_of(document: dict) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(document)
    return str(caught.value)


def test_the_stages_fill_their_own_defaults_and_refuse_the_other_stages_keys():
    config = parse_config(spec(prior=[{"process": [{"type": "adapt_rotation", "stage": 1}]}], process=[STAGE_2]))
    learner = config.spec.prior[0].process[0]
    assert (learner.steps, learner.quant_dtype, learner.layer_type, learner.max_samples) == (20, "int4", ["up_proj"],
                                                                                          2048)
    applier = config.spec.process[0]
    assert (applier.online, applier.down_proj_online_layers, applier.max_tp_size) == (False, [], 4)
    assert "online belong(s) to adapt_rotation stage 2" in error_of(
        spec(prior=[{"process": [{**STAGE_1, "online": True}]}], process=[STAGE_2]))
    assert "steps belong(s) to adapt_rotation stage 1" in error_of(
        spec(prior=[{"process": [STAGE_1]}], process=[{**STAGE_2, "steps": 3}]))
    assert "max_tp_size must be 1 or a power of 2" in error_of(
        spec(prior=[{"process": [STAGE_1]}], process=[{**STAGE_2, "max_tp_size": 3}]))
    assert "less than or equal to 1000" in error_of(spec(prior=[{"process": [{**STAGE_1, "steps": 1001}]}],
                                                         process=[STAGE_2]))


@pytest.mark.parametrize("fields,words", [
    ({"process": [STAGE_1, STAGE_2]}, "move it to spec.prior"),
    ({"process": [STAGE_2]}, "add it there"),
    ({"prior": [{"process": [STAGE_1]}], "process": [W4A4]}, "that nothing applies"),
    ({"prior": [{"process": [{"type": "smooth_quant"}]}], "process": [STAGE_2]}, "put smooth_quant in spec.process"),
    ({"prior": [{"process": [STAGE_2]}], "process": [STAGE_2]}, "holds adapt_rotation stage 2"),
    ({"prior": [{"process": [STAGE_1]}, {"process": [STAGE_1]}], "process": [STAGE_2]}, "more than once"),
    ({"prior": [{"process": [STAGE_1]}], "process": [W4A4, STAGE_2]}, "must come before quantization"),
    ({"prior": [{"process": []}], "process": [STAGE_2]}, "at least 1 item"),
])
def test_misplaced_stages_are_refused_with_where_they_belong(fields, words):
    assert words in error_of(spec(**fields))


# ---- whole runs -------------------------------------------------------------------------------------------------

def write(path: Path, dataset: str, process: list, prior: list | None = None, runner: str = "layer_wise") -> Path:
    fields = {"runner": runner, "dataset": dataset, "process": process}
    if prior is not None:
        fields["prior"] = prior
    path.write_text(yaml.safe_dump(spec(**fields)))
    return path


def logits(model, seed: int = 1) -> torch.Tensor:
    ids = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def up_proj_rows(model, texts: list[str], source: Path) -> torch.Tensor:
    """Stage 1's rows, computed independently: each layer's post-attention norm input, normalised without the gain;
    layer by layer, each layer's texts shortest first (the order the run's batches come in)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    encoded = sorted((tokenizer(text, return_tensors="pt") for text in texts), key=lambda e: e["input_ids"].shape[1])
    rows = {i: [] for i in range(len(model.model.layers))}
    hooks = [layer.post_attention_layernorm.register_forward_pre_hook(
        lambda m, a, i=i: rows[i].append(torch.nn.functional.rms_norm(a[0].float(), (a[0].shape[-1],),
                                                                      eps=m.variance_epsilon)))
        for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        for inputs in encoded:
            model(**inputs)
    for hook in hooks:
        hook.remove()
    return torch.cat([r.reshape(-1, r.shape[-1]) for i in rows for r in rows[i]])


@pytest.mark.parametrize("family,model_type", [("llama", "Llama-2-7B"), ("qwen3", "Qwen3-8B")])
def test_the_learned_rotation_is_applied_exactly_and_saved(tmp_path, family, model_type):
    source = make_tiny_model(tmp_path / "src", family, seed=5)
    model = with_norm_weights(source)
    dataset = small_calib(tmp_path)
    out = tmp_path / "out"
    run_quant(source, out, write(tmp_path / "c.yaml", dataset, [STAGE_2], [{"process": [STAGE_1]}]), model_type)
    rotated = load_ascendv1(out)
    assert torch.allclose(logits(model), logits(rotated), rtol=1e-4, atol=1e-4)  # a rotation: float unchanged
    q = load_file(out / "optional" / "quarot.safetensors")["global_rotation"].double()
    hidden = model.config.hidden_size
    assert torch.allclose(q @ q.T, torch.eye(hidden, dtype=torch.float64), atol=1e-5)
    start = starting_rotation(hidden, -1, 0)
    assert not torch.allclose(q, start, atol=1e-3)  # learned, not QuaRot's
    # it is what stage 1's rule gives on these rows (at most 2048 per layer: the tiny set has fewer, all kept)
    texts = [json.loads(line)["text"] for line in Path(dataset).read_text().splitlines()]
    rows = up_proj_rows(model, texts, source)
    assert len(rows) < 2048
    expected = learn_rotation(rows, start, 4, STAGE_1["steps"], hidden)
    assert torch.allclose(q, expected.rotation, atol=1e-4)
    assert quantization_error(rows, q.float(), 4) < quantization_error(rows, start.float(), 4)


def test_both_runners_write_the_same_bytes_and_w4a4_with_online_rotations_reads_back(tmp_path):
    source = make_tiny_model(tmp_path / "src", "llama", seed=3)
    dataset = small_calib(tmp_path)
    online = {**STAGE_2, "online": True, "down_proj_online_layers": [0, 1], "max_tp_size": 1}
    outs = {}
    for runner in ("layer_wise", "model_wise"):
        outs[runner] = tmp_path / runner
        run_quant(source, outs[runner], write(tmp_path / f"{runner}.yaml", dataset, [online, W4A4],
                                              [{"process": [STAGE_1]}], runner))
    shards = {r: {p.name: p.read_bytes() for p in out.glob("*.safetensors")} for r, out in outs.items()}
    assert shards["layer_wise"] == shards["model_wise"] and shards["layer_wise"]
    description = json.loads((outs["layer_wise"] / "quant_model_description.json").read_text())
    assert description["model.layers.0.mlp.up_proj.weight"] == "W4A4_DYNAMIC"
    quantized = load_ascendv1(outs["layer_wise"])
    float_model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    a, b = logits(quantized), logits(float_model)
    assert torch.isfinite(a).all()
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.5


def test_a_prior_stage_on_its_own_dataset_is_read_before_any_weight(tmp_path, monkeypatch):
    source = make_tiny_model(tmp_path / "src", "llama", seed=3)
    dataset = small_calib(tmp_path)
    config = write(tmp_path / "c.yaml", dataset, [STAGE_2],
                   [{"process": [STAGE_1], "dataset": str(tmp_path / "missing.jsonl")}])
    read = []
    from msmodelslim.model import transformers_model
    monkeypatch.setattr(transformers_model.TransformersModel, "load_weights",
                        lambda *a, **k: read.append(1) or pytest.fail("a weight was read"))
    with pytest.raises(InvalidDatasetError, match=r"spec.prior\[0\].dataset: dataset .*missing.jsonl' not found"):
        run_quant(source, tmp_path / "out", config)
    assert not read and not (tmp_path / "out").exists()


@pytest.mark.parametrize("layer_type,words", [
    (["down_proj"], "which do(es) not read the residual"),
    (["no_such_linear"], "names no linear"),
])
def test_what_stage_1_cannot_do_is_refused_by_name_before_any_weight(tmp_path, layer_type, words):
    source = make_tiny_model(tmp_path / "src", "llama", seed=3)
    prior = [{"process": [{**STAGE_1, "layer_type": layer_type}]}]
    config = write(tmp_path / "c.yaml", small_calib(tmp_path), [STAGE_2], prior)
    with pytest.raises(UnsupportedError) as caught:
        run_quant(source, tmp_path / "out", config)
    assert words in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_two_data_parallel_ranks_write_what_one_process_writes(tmp_path):
    """Each rank forwards its share of the prior stage's data and the rows are gathered in rank order: with no rank
    over 2·max_samples tokens, the rows, and so the rotation and every byte, are one process's."""
    from msmodelslim.core.device import DeviceSpec

    source = make_tiny_model(tmp_path / "src", "llama", seed=3)
    dataset = small_calib(tmp_path)
    steps = [STAGE_2, {"type": "linear_quant", "qconfig": SCHEMES["w8a8_dynamic"], "exclude": ["lm_head"]}]
    one, two = tmp_path / "one", tmp_path / "two"
    run_quant(source, one, write(tmp_path / "one.yaml", dataset, steps, [{"process": [STAGE_1]}]))
    run_quant(source, two, write(tmp_path / "two.yaml", dataset, steps, [{"process": [STAGE_1]}], "dp_layer_wise"),
              device=DeviceSpec("cpu", (0, 1)))
    files = lambda out: {p.name: p.read_bytes() for p in sorted(out.rglob("*.safetensors"))}
    assert files(one) == files(two) and "quarot.safetensors" in files(one)


def test_a_dry_run_plans_without_learning(tmp_path):
    source = make_tiny_model(tmp_path / "src", "llama", seed=3)
    config = write(tmp_path / "c.yaml", small_calib(tmp_path), [STAGE_2, W4A4], [{"process": [STAGE_1]}])
    report = run_quant(source, tmp_path / "out", config, dry_run=True, estimate=True)
    assert report.estimate is not None and report.plan["model.layers.0.mlp.up_proj"] == "W4A4_DYNAMIC"
    assert report.estimate.seconds_by_phase["spec.prior stages"] > 0
    assert any("spec.prior (1 stage(s))" in line for line in report.estimate.assumptions)
    assert not (tmp_path / "out").exists()


def test_a_killed_run_resumes_to_identical_bytes(tmp_path, monkeypatch):
    """Resume re-runs the prior stage (deterministic) and continues the main one from its last checkpoint."""
    monkeypatch.setenv(INTERVAL_ENV, "0")
    code = tmp_path / "code"
    shutil.copytree(Path(__file__).resolve().parents[1] / "msmodelslim", code / "msmodelslim",
                    ignore=shutil.ignore_patterns("__pycache__"))
    source = make_tiny_model(tmp_path / "src", "llama", seed=3, num_hidden_layers=3)
    config = write(tmp_path / "c.yaml", small_calib(tmp_path),
                   [STAGE_2, {"type": "linear_quant", "qconfig": SCHEMES["w8a8_dynamic"], "exclude": ["lm_head"]}],
                   [{"process": [STAGE_1]}])

    def quant(out: Path, *extra: str, fault: str | None = None) -> subprocess.CompletedProcess:
        env = {**os.environ, "MSMODELSLIM_LOG_LEVEL": "info", "PYTHONPATH": str(code)}
        if fault:
            env["MSMODELSLIM_FAULT_AT"] = fault
        argv = ["quant", "--model_path", str(source), "--save_path", str(out), "--device", "cpu", "--model_type",
                "Llama-2-7B", "--config_path", str(config), *extra]
        return subprocess.run([sys.executable, "-m", "msmodelslim", *argv], capture_output=True, text=True, env=env,
                              timeout=300, cwd=code)

    done = quant(tmp_path / "ref")
    assert done.returncode == 0, done.stderr
    killed = quant(tmp_path / "out", fault="checkpoint:1")
    assert killed.returncode == -signal.SIGKILL
    resumed = quant(tmp_path / "out", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed run: computed 1 of 3 blocks" in resumed.stderr
    files = lambda out: {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
                         if p.is_file() and p.name != ".msmodelslim.json"}
    assert files(tmp_path / "out") == files(tmp_path / "ref")


def test_the_laos_practice_serves_qwen3_32b_and_runs(tmp_path):
    """--quant_type w4a4 picks the LAOS practice for Qwen3-32B (only); run as written but for AutoRound's 400 steps
    (2 here) and the calibration set (a few samples), it writes W4A4_DYNAMIC gate/up and W8A8_DYNAMIC elsewhere."""
    from msmodelslim.app.practice import select_practice

    practice = select_practice("Qwen3-32B", "qwen3", "w4a4")
    assert practice.metadata.config_id == "qwen3-w4a4"
    with pytest.raises(UnsupportedError, match="verified for Qwen3-32B only"):
        select_practice("Qwen3-8B", "qwen3", "w4a4")
    document = yaml.safe_load(practice.path.read_text())
    document["spec"]["process"][1]["iters"] = 2
    document["spec"]["dataset"] = small_calib(tmp_path)
    config = tmp_path / "laos.yaml"
    config.write_text(yaml.safe_dump(document))
    source = make_tiny_model(tmp_path / "src", "qwen3", seed=2)
    run_quant(source, tmp_path / "out", config, "Qwen3-32B")
    description = json.loads((tmp_path / "out" / "quant_model_description.json").read_text())
    assert description["model.layers.0.mlp.gate_proj.weight"] == "W4A4_DYNAMIC"
    assert description["model.layers.0.mlp.down_proj.weight"] == "W8A8_DYNAMIC"
    assert description["model.layers.0.self_attn.q_proj.weight"] == "W8A8_DYNAMIC"
    assert "global_rotation" in load_file(tmp_path / "out" / "optional" / "quarot.safetensors")


@pytest.mark.parametrize("family,model_type", [("qwen3_moe", "Qwen3-30B-A3B"), ("deepseek_v3", "DeepSeek-V3")])
def test_moe_and_latent_attention_families_learn_and_stay_exact(tmp_path, family, model_type):
    """up_proj names the routed and shared experts' up projections: their norm is collected once per layer; the
    rotation reaches the router and every expert as quarot's does."""
    from test_quarot_moe import randomize_gains

    source = make_tiny_model(tmp_path / "src", family, seed=5)
    model = randomize_gains(source)
    run_quant(source, tmp_path / "out", write(tmp_path / "c.yaml", small_calib(tmp_path), [STAGE_2],
                                              [{"process": [STAGE_1]}]), model_type)
    rotated = load_ascendv1(tmp_path / "out")
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        delta = (model(input_ids=ids).logits - rotated(input_ids=ids).logits).abs().max().item()
    assert delta < 1e-4
    q = load_file(tmp_path / "out" / "optional" / "quarot.safetensors")["global_rotation"].double()
    assert not torch.allclose(q, starting_rotation(model.config.hidden_size, -1, 0), atol=1e-3)


def test_a_vision_language_model_learns_on_its_text_layers_and_stays_exact(tmp_path, images):
    """multimodal_vlm_modelslim_v1 with spec.prior: stage 1 calibrates on the config's images and prompts, collects
    only the text decoder's rows (the vision tower is a block of its own, not a decoder layer), and the rotation it
    learns is the one stage 1's rule gives on those rows, computed here from transformers' forward of the same
    batches; written and read back, the rotated model is exact in float on an image."""
    from tiny_vlm import make_tiny_vlm

    from msmodelslim.core.config import DEFAULT_VLM_TEXT
    from msmodelslim.core.vlm_dataset import load_vlm_samples
    from msmodelslim.model.vlm import Qwen3VlAdapter

    source = make_tiny_vlm(tmp_path / "vlm", "qwen3_vl")
    dataset = str(images[0].parent)
    config = tmp_path / "vlm.yaml"
    config.write_text(yaml.safe_dump({"apiversion": "multimodal_vlm_modelslim_v1", "spec": {
        "dataset": dataset, "prior": [{"process": [STAGE_1]}], "process": [STAGE_2],
        "save": [{"type": "ascendv1_saver", "part_file_size": 4}]}}))
    out = tmp_path / "out"
    # the dry run times the stage on a text layer, fed through the vision tower first
    planned = run_quant(source, out, config, "Qwen3-VL-4B-Instruct", dry_run=True, estimate=True)
    assert planned.estimate.seconds_by_phase["spec.prior stages"] > 0 and not out.exists()
    run_quant(source, out, config, "Qwen3-VL-4B-Instruct")

    adapter = Qwen3VlAdapter("Qwen3-VL-4B-Instruct", source)
    reference = adapter.init_model(torch.device("cpu"), load_layers=True)
    batches = adapter.handle_dataset(load_vlm_samples(dataset, DEFAULT_VLM_TEXT), torch.device("cpu"))
    layers = reference.model.language_model.layers
    rows = {i: [] for i in range(len(layers))}
    hooks = [layer.post_attention_layernorm.register_forward_pre_hook(
        lambda m, a, i=i: rows[i].append(torch.nn.functional.rms_norm(a[0].float(), (a[0].shape[-1],),
                                                                      eps=m.variance_epsilon)))
        for i, layer in enumerate(layers)]
    with torch.no_grad():
        want = [reference(**batch, use_cache=False).logits.float() for batch in batches]
    for hook in hooks:
        hook.remove()
    rows = torch.cat([r.reshape(-1, r.shape[-1]) for i in rows for r in rows[i]])
    assert len(rows) < 2048 * len(layers)  # nothing thinned: every row is stage 1's

    q = load_file(out / "optional" / "quarot.safetensors")["global_rotation"].double()
    hidden = reference.config.text_config.hidden_size
    start = starting_rotation(hidden, -1, 0)
    assert not torch.allclose(q, start, atol=1e-3)  # learned, not QuaRot's
    expected = learn_rotation(rows, start, 4, STAGE_1["steps"], hidden)
    assert torch.allclose(q, expected.rotation, atol=1e-4)
    rotated = load_ascendv1(out)
    with torch.no_grad():
        for batch, logits_wanted in zip(batches, want):
            got = rotated(**batch, use_cache=False).logits.float()
            assert (got - logits_wanted).abs().max().item() < 1e-4  # a rotation: float unchanged
