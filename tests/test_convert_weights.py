"""`apiversion: modelslim_convert` (app/convert_weights.py): offline FP8 block -> float and float -> W8A8_MXFP8 on
tiny checkpoints written as safetensors, through the command line, against slow references and against what
`quant` writes for the same scheme."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from helpers import run_quant
from test_moe import read_tensors as stored  # every tensor of a directory's safetensors files
from msmodelslim.cli.__main__ import main
from tiny_models import make_tiny_model

BLOCK = (16, 32)  # the tiny checkpoint's FP8 blocks: several per weight (hidden 64), not square
LINEARS = ["model.layers.*.self_attn.*_proj", "model.layers.*.mlp.*_proj"]


def write_fp8_block(source: Path, target: Path) -> Path:
    """The float checkpoint `source` as a block-FP8 one (DeepSeek-V3's layout): every decoder linear's weight in
    float8_e4m3fn with a float32 `weight_scale_inv` per BLOCK, config.json's quantization_config naming it."""
    target.mkdir(parents=True)
    for file in source.iterdir():
        if file.is_file() and not file.name.endswith(".safetensors"):
            target.joinpath(file.name).write_bytes(file.read_bytes())
    tensors = {}
    for name, tensor in load_file(source / "model.safetensors").items():
        if name.startswith("model.layers.") and name.endswith("_proj.weight"):
            rows, cols = tensor.shape
            scale = torch.empty(math.ceil(rows / BLOCK[0]), math.ceil(cols / BLOCK[1]))
            codes = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
            for i in range(scale.shape[0]):
                for j in range(scale.shape[1]):
                    block = tensor[i * BLOCK[0]:(i + 1) * BLOCK[0], j * BLOCK[1]:(j + 1) * BLOCK[1]].float()
                    scale[i, j] = block.abs().max() / 448
                    codes[i * BLOCK[0]:(i + 1) * BLOCK[0], j * BLOCK[1]:(j + 1) * BLOCK[1]] = \
                        (block / scale[i, j]).to(torch.float8_e4m3fn)
            tensors[name], tensors[name.replace(".weight", ".weight_scale_inv")] = codes, scale
        else:
            tensors[name] = tensor
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((target / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(BLOCK)}
    (target / "config.json").write_text(json.dumps(config))
    return target


def slow_dequantized(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Element by element: code · the scale of its block."""
    out = torch.empty(codes.shape)
    for r in range(codes.shape[0]):
        for c in range(codes.shape[1]):
            out[r, c] = codes[r, c].float() * scale[r // BLOCK[0], c // BLOCK[1]]
    return out


def convert_yaml(path: Path, target: str, save: str, match=LINEARS, **spec) -> Path:
    path.write_text(yaml.safe_dump({"apiversion": "modelslim_convert", "spec": {
        "linears": [{"match": match, "target": target, "route": spec.pop("route", "auto")}],
        "save": [{"type": save, "part_file_size": spec.pop("part_file_size", 4)}], **spec}}))
    return path


def run_convert(model: Path, out: Path, config: Path, *extra: str) -> int:
    return main(["quant", "--model_path", str(model), "--save_path", str(out), "--config_path", str(config), *extra])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("convert")
    float_model = make_tiny_model(root / "bf16", "qwen3", dtype=torch.bfloat16, seed=4)
    return {"bf16": float_model, "fp8": write_fp8_block(float_model, root / "fp8"),
            "bf16_tied": make_tiny_model(root / "tied", "llama", dtype=torch.bfloat16, seed=5, tie=True)}


def test_fp8_blocks_dequantize_to_bf16_exactly_and_transformers_loads_the_output(tmp_path, checkpoints):
    source = checkpoints["fp8"]
    out = tmp_path / "out"
    assert run_convert(source, out, convert_yaml(tmp_path / "c.yaml", "FLOAT", "huggingface")) == 0
    written, original = stored(out), load_file(source / "model.safetensors")
    scales = [n for n in original if n.endswith("weight_scale_inv")]
    assert scales and not any(n.endswith("weight_scale_inv") for n in written)
    for name in scales:
        weight = name.replace("_scale_inv", "")
        want = slow_dequantized(original[weight], original[name]).to(torch.bfloat16)
        assert written[weight].dtype == torch.bfloat16 and torch.equal(written[weight], want), weight
    for name, tensor in original.items():  # what no rule names is written unchanged
        if name not in scales and name.replace(".weight", ".weight_scale_inv") not in original:
            assert written[name].dtype == tensor.dtype and torch.equal(written[name], tensor), name
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert (out / "convert_best_practice.yaml").is_file()
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(model(input_ids=ids).logits).all()


@pytest.mark.parametrize("source,model_type", [("bf16", "Qwen3-8B"), ("bf16_tied", "Llama-2-7B")])
def test_bf16_to_mxfp8_writes_what_quant_writes_and_our_reader_reads_it(tmp_path, checkpoints, source, model_type):
    """The same MXFP8 codes, scales and description tags as `quant` with a data-free W8A8 MXFP8 linear_quant; a
    tied head is described under lm_head.weight, as quant writes it."""
    source = checkpoints[source]
    converted = tmp_path / "converted"
    assert run_convert(source, converted, convert_yaml(tmp_path / "c.yaml", "W8A8_MXFP8", "ascend_v1")) == 0
    mxfp8 = {"dtype": "mxfp8", "scope": "per_block", "symmetric": True, "method": "minmax"}
    quant_config = tmp_path / "q.yaml"
    quant_config.write_text(yaml.safe_dump({"apiversion": "modelslim_v1", "spec": {
        "process": [{"type": "linear_quant", "include": LINEARS, "qconfig": {"weight": mxfp8, "act": mxfp8}}],
        "save": [{"type": "ascendv1_saver", "part_file_size": 4}]}}))
    quantized = tmp_path / "quantized"
    run_quant(source, quantized, quant_config, model_type)
    got, want = stored(converted), stored(quantized)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name
    got_description = json.loads((converted / "quant_model_description.json").read_text())
    want_description = json.loads((quantized / "quant_model_description.json").read_text())
    assert {k: v for k, v in got_description.items() if k in want} == {k: v for k, v in want_description.items()
                                                                        if k in want}
    assert got_description["model_quant_type"] == "W8A8_MXFP8"
    from msmodelslim.format.ascendv1.reader import load_ascendv1

    model = load_ascendv1(converted)
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_fp8_to_mxfp8_goes_through_the_float_checkpoint(tmp_path, checkpoints):
    """route auto FP8_BLOCK -> FLOAT -> W8A8_MXFP8 equals two runs: FP8 -> bf16, then bf16 -> MXFP8; an explicit
    route writes the same bytes."""
    direct, explicit, as_float, two_steps = (tmp_path / n for n in ("direct", "explicit", "float", "two"))
    assert run_convert(checkpoints["fp8"], direct, convert_yaml(tmp_path / "a.yaml", "W8A8_MXFP8", "ascendv1")) == 0
    route = ["FP8_BLOCK", "FLOAT", "W8A8_MXFP8"]
    assert run_convert(checkpoints["fp8"], explicit,
                       convert_yaml(tmp_path / "e.yaml", "W8A8_MXFP8", "ascendv1", route=route)) == 0
    assert run_convert(checkpoints["fp8"], as_float, convert_yaml(tmp_path / "f.yaml", "FLOAT", "hf")) == 0
    assert run_convert(as_float, two_steps, convert_yaml(tmp_path / "m.yaml", "W8A8_MXFP8", "ascendv1")) == 0
    one, two, three = stored(direct), stored(two_steps), stored(explicit)
    assert one.keys() == two.keys() == three.keys()
    assert all(torch.equal(one[n], two[n]) and torch.equal(one[n], three[n]) for n in one)
    assert "quantization_config" not in json.loads((direct / "config.json").read_text())


def test_rename_with_wildcards_and_a_dry_run_that_writes_nothing(tmp_path, checkpoints, capsys):
    config = convert_yaml(tmp_path / "c.yaml", "W8A8_MXFP8", "ascend_v1", match=["model.layers.*.mlp.down"],
                          preprocess=[{"type": "rename", "patterns": [
                              {"from": "model.layers.*.mlp.down_proj.weight",
                               "to": "model.layers.*.mlp.down.weight"}]}])
    out = tmp_path / "out"
    assert run_convert(checkpoints["bf16"], out, config, "--dry_run") == 0
    printed = capsys.readouterr().out
    assert "2 linears FLOAT -> W8A8_MXFP8" in printed and not out.exists()
    assert run_convert(checkpoints["bf16"], out, config) == 0
    description = json.loads((out / "quant_model_description.json").read_text())
    assert description["model.layers.1.mlp.down.weight"] == "W8A8_MXFP8"
    assert description["model.layers.1.mlp.up_proj.weight"] == "FLOAT"
    assert "model.layers.1.mlp.down_proj.weight" not in description


@pytest.mark.parametrize("case,words", [
    ("mxfp8_as_hf", "only the ascendv1 format holds"),
    ("unknown_target", "no implemented conversion reaches it"),
    ("backward_route", "the step FLOAT -> FP8_BLOCK is no conversion of the IR graph"),
    ("two_ops", "2 ops in one convert step: write one step per op"),
    ("matches_nothing", "names no weight of the checkpoint"),
    ("fp8_left_in_ascendv1", "no rule converts"),
    ("float_source_for_fp8_route", "is FLOAT in the checkpoint; route starts at FP8_BLOCK"),
    ("resume", "keeps no checkpoints to resume from"),
])
def test_what_cannot_be_done_is_refused_before_anything_is_written(tmp_path, checkpoints, capsys, case, words):
    model, extra = checkpoints["fp8"], []
    config = {
        "mxfp8_as_hf": lambda p: convert_yaml(p, "W8A8_MXFP8", "hf"),
        "unknown_target": lambda p: convert_yaml(p, "NVFP4_MODELOPT", "hf"),
        "backward_route": lambda p: convert_yaml(p, "FP8_BLOCK", "ascend_v1", route=["FLOAT", "FP8_BLOCK"]),
        "two_ops": lambda p: convert_yaml(p, "FLOAT", "hf", preprocess=[
            {"type": "convert", "source": ["a.*.b", "a.*.c"], "target": ["d.*"],
             "ops": [{"type": "merge"}, {"type": "merge"}]}]),
        "matches_nothing": lambda p: convert_yaml(p, "FLOAT", "hf", match=["model.layers.*.mlp.experts.*"]),
        "fp8_left_in_ascendv1": lambda p: convert_yaml(p, "W8A8_MXFP8", "ascend_v1", match=["model.layers.0.*"]),
        "float_source_for_fp8_route": lambda p: convert_yaml(p, "FLOAT", "hf", route=["FP8_BLOCK", "FLOAT"]),
        "resume": lambda p: convert_yaml(p, "FLOAT", "hf"),
    }[case](tmp_path / "c.yaml")
    if case == "float_source_for_fp8_route":
        model = checkpoints["bf16"]
    if case == "resume":
        extra = ["--resume"]
    out = tmp_path / "out"
    assert run_convert(model, out, config, *extra) != 0
    assert words in capsys.readouterr().err
    assert not out.exists()


def test_pack_quantized_int4_dequantizes_as_the_library_does_and_goes_on_to_mxfp8(tmp_path):
    """INT4_PACKED (compressed-tensors pack-quantized, Kimi-K2-Thinking's experts) -> FLOAT equals the library's
    dequantization; -> W8A8_MXFP8 goes through that float weight; converting only some of them is refused."""
    from test_families_int4 import compress_experts

    float_source = make_tiny_model(tmp_path / "float", "kimi_k2")
    source = tmp_path / "int4"
    meant = compress_experts(float_source, source)
    experts = ["model.layers.*.mlp.experts.*.*_proj"]
    as_float = tmp_path / "float_out"
    assert run_convert(source, as_float, convert_yaml(tmp_path / "f.yaml", "FLOAT", "hf", match=experts)) == 0
    written = stored(as_float)
    dtype = written["model.embed_tokens.weight"].dtype
    for name, (_, fake_quantized, _) in meant.items():
        assert torch.equal(written[name], fake_quantized.to(dtype)), name
    assert not any(n.endswith(("weight_packed", "weight_scale", "weight_shape")) for n in written)
    assert "quantization_config" not in json.loads((as_float / "config.json").read_text())
    direct, two_steps = tmp_path / "direct", tmp_path / "two"
    assert run_convert(source, direct, convert_yaml(tmp_path / "m.yaml", "W8A8_MXFP8", "ascend_v1", match=experts)) == 0
    assert run_convert(as_float, two_steps, convert_yaml(tmp_path / "n.yaml", "W8A8_MXFP8", "ascend_v1",
                                                         match=experts)) == 0
    one, two = stored(direct), stored(two_steps)
    assert one.keys() == two.keys() and all(torch.equal(one[n], two[n]) for n in one)
    description = json.loads((direct / "quant_model_description.json").read_text())
    assert all(description[name] == "W8A8_MXFP8" for name in meant)
    assert run_convert(source, tmp_path / "part", convert_yaml(tmp_path / "p.yaml", "FLOAT", "hf",
                                                              match=["model.layers.*.mlp.experts.*.gate_proj"])) != 0
    assert not (tmp_path / "part").exists()


def stack_experts(source: Path, target: Path) -> Path:
    """`source` (experts stored one tensor set per expert) with each layer's experts stacked as transformers holds
    them in memory: `experts.gate_up_proj` [E, 2I, H] (each expert's gate rows, then its up rows) and
    `experts.down_proj` [E, H, I]."""
    target.mkdir()
    for file in source.iterdir():
        if file.is_file() and not file.name.endswith(".safetensors"):
            target.joinpath(file.name).write_bytes(file.read_bytes())
    tensors = load_file(source / "model.safetensors")
    experts = json.loads((source / "config.json").read_text())["num_local_experts"]
    layers = {n.split(".mlp.experts.")[0] for n in tensors if ".mlp.experts." in n}
    for layer in layers:
        one = [f"{layer}.mlp.experts.{e}" for e in range(experts)]
        tensors[f"{layer}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([tensors.pop(f"{p}.gate_proj.weight"), tensors.pop(f"{p}.up_proj.weight")]) for p in one])
        tensors[f"{layer}.mlp.experts.down_proj"] = torch.stack([tensors.pop(f"{p}.down_proj.weight") for p in one])
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


def test_stacked_experts_are_chunked_per_expert_then_converted(tmp_path):
    """preprocess convert/chunk: stacked gate_up_proj and down_proj become the per-expert weights they stack, read
    one expert at a time; converted, they equal the conversion of the per-expert checkpoint."""
    per_expert = make_tiny_model(tmp_path / "moe", "qwen3_moe", dtype=torch.bfloat16, seed=2)
    stacked = stack_experts(per_expert, tmp_path / "stacked")
    experts = ["model.layers.*.mlp.experts.*.*_proj"]
    split = [{"type": "convert", "source": ["model.layers.*.mlp.experts.gate_up_proj"],
              "target": ["model.layers.*.mlp.experts.*.gate_proj.weight",
                         "model.layers.*.mlp.experts.*.up_proj.weight"],
              "ops": [{"type": "chunk", "dim": 1, "projections": ["gate_proj", "up_proj"]}]},
             {"type": "convert", "source": ["model.layers.*.mlp.experts.down_proj"],
              "target": ["model.layers.*.mlp.experts.*.down_proj.weight"],
              "ops": [{"type": "chunk", "projections": ["down_proj"]}]}]
    as_float, from_stacked, from_per_expert = tmp_path / "float", tmp_path / "a", tmp_path / "b"
    assert run_convert(stacked, as_float, convert_yaml(tmp_path / "f.yaml", "FLOAT", "hf", match=experts,
                                                       preprocess=split)) == 0
    original, written = load_file(per_expert / "model.safetensors"), stored(as_float)
    assert written.keys() == original.keys()
    assert all(torch.equal(written[n], original[n]) for n in original)
    assert run_convert(stacked, from_stacked, convert_yaml(tmp_path / "s.yaml", "W8A8_MXFP8", "ascend_v1",
                                                           match=experts, preprocess=split)) == 0
    assert run_convert(per_expert, from_per_expert, convert_yaml(tmp_path / "p.yaml", "W8A8_MXFP8", "ascend_v1",
                                                                 match=experts)) == 0
    one, two = stored(from_stacked), stored(from_per_expert)
    assert one.keys() == two.keys() and all(torch.equal(one[n], two[n]) for n in one)


def test_per_expert_weights_merge_into_the_stacked_layout(tmp_path):
    """preprocess convert/merge (chunk's inverse): each layer's experts concatenated (gate rows, then up rows) and
    stacked, as transformers holds them; the linears still named are converted as usual."""
    per_expert = make_tiny_model(tmp_path / "moe", "qwen3_moe", dtype=torch.bfloat16, seed=3)
    want = load_file(stack_experts(per_expert, tmp_path / "stacked") / "model.safetensors")
    experts = "model.layers.*.mlp.experts.*"
    merge = [{"type": "convert", "source": [f"{experts}.gate_proj.weight", f"{experts}.up_proj.weight"],
              "target": ["model.layers.*.mlp.experts.gate_up_proj"], "ops": [{"type": "merge", "dim": 0}]},
             {"type": "convert", "source": [f"{experts}.down_proj.weight"],
              "target": ["model.layers.*.mlp.experts.down_proj"], "ops": [{"type": "merge"}]}]
    out = tmp_path / "out"
    config = convert_yaml(tmp_path / "m.yaml", "FLOAT", "hf", match=["model.layers.*.self_attn.*_proj"],
                          preprocess=merge)
    assert run_convert(per_expert, out, config) == 0
    written = stored(out)
    assert written.keys() == want.keys()
    assert all(torch.equal(written[n], want[n]) for n in want)
    incomplete = [{**merge[0], "source": [f"{experts}.gate_proj.weight", "model.layers.*.mlp.experts.0.*.weight"]}]
    assert run_convert(per_expert, tmp_path / "bad", convert_yaml(tmp_path / "b.yaml", "FLOAT", "hf",
                                                                  preprocess=incomplete)) != 0
