"""Nothing of the input checkpoint is dropped silently: tensors the model built from config.json does not read (a
DeepSeek-V3 multi-token-prediction layer, a stray tensor) reach the output unchanged, tagged FLOAT, with every
runner and both writers and through `convert`; the tensors that are not written (block-FP8 scales, rotary
inv_freq) are named in the log with the reason; `check --model_path` compares the output's tensor set with the
input's and names what is missing; a rotation that would leave an MTP layer inconsistent is refused before any
weight is read."""
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helpers import SCHEMES, run_quant
from msmodelslim.app.convert import convert_ascendv1_to_compressed_tensors
from msmodelslim.cli.__main__ import main
from msmodelslim.core.device import DeviceSpec
from msmodelslim.core.errors import FormatCheckError, InvalidModelError, UnsupportedError
from msmodelslim.core.passthrough import write_passthrough
from msmodelslim.format.integrity import verify_source_tensors
from msmodelslim.model.checkpoint import SafetensorsCheckpoint
from msmodelslim.model.passthrough import MTP
from msmodelslim.model.registry import create_adapter
from msmodelslim.processor.base import Processor
from tiny_models import make_tiny_model

MTP_LAYER = "model.layers.3"  # the tiny DeepSeek-V3 has num_hidden_layers 3
MTP_OWN = ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight", "shared_head.head.weight",
           "embed_tokens.weight")
EXPERTS = "*.mlp.experts.*"
TWO_CPU_RANKS = DeviceSpec("cpu", (0, 1))


def add_mtp_layer(path: Path) -> Path:
    """A tiny DeepSeek-V3 checkpoint that holds one MTP layer as published ones do: saved with four decoder
    layers, config.json then says num_hidden_layers 3 and num_nextn_predict_layers 1, and layer 3 gets the MTP
    layer's own tensors (enorm, hnorm, eh_proj [H, 2H], shared_head.norm/head, embed_tokens)."""
    make_tiny_model(path, "deepseek_v3", dtype=torch.bfloat16, num_hidden_layers=4)
    config = json.loads((path / "config.json").read_text())
    config.update(num_hidden_layers=3, num_nextn_predict_layers=1)
    (path / "config.json").write_text(json.dumps(config))
    (weights,) = path.glob("*.safetensors")
    tensors = load_file(weights)
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    generator = torch.Generator().manual_seed(7)
    shapes = {"enorm.weight": [hidden], "hnorm.weight": [hidden], "eh_proj.weight": [hidden, 2 * hidden],
              "shared_head.norm.weight": [hidden], "shared_head.head.weight": [vocab, hidden],
              "embed_tokens.weight": [vocab, hidden]}
    for name, shape in shapes.items():
        tensors[f"{MTP_LAYER}.{name}"] = (torch.randn(shape, generator=generator) * 0.08).to(torch.bfloat16)
    save_file(tensors, weights, metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def mtp_deepseek(tmp_path_factory) -> Path:
    return add_mtp_layer(tmp_path_factory.mktemp("deepseek_mtp"))


def mtp_tensors(model: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(model.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys() if k.startswith(MTP_LAYER + ".")})
    return tensors


def written(out: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def pipeline(path: Path, runner: str = "layer_wise", save: str = "ascendv1_saver", extra: tuple = ()) -> Path:
    """W4A8 dynamic experts, W8A8 dynamic elsewhere (lm_head float): no calibration data needed."""
    process = list(extra) + [
        {"type": "linear_quant", "qconfig": SCHEMES["w4a8_dynamic"], "include": [EXPERTS]},
        {"type": "linear_quant", "qconfig": SCHEMES["w8a8_dynamic"], "exclude": ["lm_head", EXPERTS]},
    ]
    spec = {"runner": runner, "process": process, "save": [{"type": save, "part_file_size": 0.0001}]}
    path.write_text(yaml.safe_dump({"apiversion": "modelslim_v1", "spec": spec}))
    return path


def check(out: Path, model_path: Path, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["check", str(out), "--model_path", str(model_path)])
    return code, capsys.readouterr().out


# ---- the MTP layer reaches the output unchanged ---------------------------------------------------------------
def test_the_tiny_checkpoint_has_a_whole_mtp_layer(mtp_deepseek):
    names = set(mtp_tensors(mtp_deepseek))
    assert len(names) == 32
    assert {f"{MTP_LAYER}.{n}" for n in MTP_OWN} <= names
    assert f"{MTP_LAYER}.mlp.experts.3.down_proj.weight" in names and f"{MTP_LAYER}.self_attn.kv_b_proj.weight" in names


@pytest.mark.parametrize("runner,device", [("layer_wise", DeviceSpec("cpu")), ("model_wise", DeviceSpec("cpu")),
                                           ("dp_layer_wise", TWO_CPU_RANKS)])
def test_mtp_layer_is_written_byte_identical_and_tagged_float(mtp_deepseek, tmp_path, capsys, log_lines, runner,
                                                               device):
    out = tmp_path / "out"
    run_quant(mtp_deepseek, out, pipeline(tmp_path / "c.yaml", runner), "DeepSeek-V3", device=device)
    source, tensors = mtp_tensors(mtp_deepseek), written(out)
    description = json.loads((out / "quant_model_description.json").read_text())
    index = json.loads((out / "quant_model_weights.safetensors.index.json").read_text())["weight_map"]
    for name, tensor in source.items():
        assert tensors[name].dtype == torch.bfloat16, name
        assert tensors[name].view(torch.uint8).equal(tensor.view(torch.uint8)), name  # the same bytes
        assert description[name] == "FLOAT" and name in index, name
    # the model itself was quantized around it
    assert description["model.layers.2.mlp.experts.0.gate_proj.weight"] == "W4A8_DYNAMIC"
    assert description["model.layers.2.self_attn.kv_b_proj.weight"] == "W8A8_DYNAMIC"
    assert any(f"{MTP_LAYER} ({MTP}, 32 tensor(s)) is written unchanged" in line for line in log_lines)
    code, report = check(out, mtp_deepseek, capsys)
    assert code == 0, report


def test_compressed_tensors_keeps_the_mtp_layer_and_ignores_its_linears(mtp_deepseek, tmp_path, capsys):
    out = tmp_path / "out"
    run_quant(mtp_deepseek, out, pipeline(tmp_path / "c.yaml", save="compressed_tensors"), "DeepSeek-V3")
    source, tensors = mtp_tensors(mtp_deepseek), written(out)
    for name, tensor in source.items():
        assert tensors[name].dtype == torch.bfloat16 and tensors[name].view(torch.uint8).equal(
            tensor.view(torch.uint8)), name
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    # vLLM wants every linear it builds either targeted or ignored; the MTP layer's stay float
    for linear in ("eh_proj", "self_attn.q_a_proj", "mlp.experts.0.gate_proj", "mlp.shared_experts.down_proj",
                   "shared_head.head"):
        assert f"{MTP_LAYER}.{linear}" in ignore, linear
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(source) <= set(index)
    code, report = check(out, mtp_deepseek, capsys)
    assert code == 0, report


def test_convert_carries_the_mtp_layer_over(mtp_deepseek, tmp_path, capsys):
    ascend, converted = tmp_path / "ascend", tmp_path / "ct"
    run_quant(mtp_deepseek, ascend, pipeline(tmp_path / "c.yaml"), "DeepSeek-V3")
    convert_ascendv1_to_compressed_tensors(ascend, converted, part_file_size_gb=0)
    source, tensors = mtp_tensors(mtp_deepseek), written(converted)
    for name, tensor in source.items():
        assert tensors[name].view(torch.uint8).equal(tensor.view(torch.uint8)), name
    code, report = check(converted, ascend, capsys)  # against its ascendv1 input
    assert code == 0, report


# ---- the checker compares tensor sets -------------------------------------------------------------------------
@pytest.mark.parametrize("save", ["ascendv1_saver", "compressed_tensors"])
def test_check_names_an_input_tensor_the_output_lacks(mtp_deepseek, tmp_path, capsys, save):
    out = tmp_path / "out"
    run_quant(mtp_deepseek, out, pipeline(tmp_path / "c.yaml", save=save), "DeepSeek-V3")
    dropped = f"{MTP_LAYER}.eh_proj.weight"
    index_file = next(out.glob("*.safetensors.index.json"))
    index = json.loads(index_file.read_text())
    shard = out / index["weight_map"].pop(dropped)
    tensors = load_file(shard)
    del tensors[dropped]
    save_file(tensors, shard, metadata={"format": "pt"})
    index_file.write_text(json.dumps(index))
    description_file = out / "quant_model_description.json"
    if description_file.exists():  # keep the ascendv1 checklist itself satisfied: only the comparison can tell
        description = json.loads(description_file.read_text())
        del description[dropped]
        description_file.write_text(json.dumps(description))
    capsys.readouterr()
    assert main(["check", str(out)]) == 0  # the format alone is fine
    code, report = check(out, mtp_deepseek, capsys)
    assert code == 4
    assert f"error: tensor {dropped} of {mtp_deepseek} is missing" in report and "1 error(s)" in report


def test_a_quant_run_that_loses_an_input_tensor_is_not_moved_into_place(mtp_deepseek, tmp_path, monkeypatch):
    """The same comparison is the run's last check: a writer that silently skipped a pass-through tensor fails."""
    from msmodelslim.format.ascendv1.writer import AscendV1Writer

    add = AscendV1Writer.add_passthrough
    monkeypatch.setattr(AscendV1Writer, "add_passthrough",
                        lambda self, name, tensor: None if name.endswith("hnorm.weight") else add(self, name, tensor))
    with pytest.raises(FormatCheckError, match=rf"lacks 1 tensor\(s\) of .* \({MTP_LAYER}\.hnorm\.weight\)"):
        run_quant(mtp_deepseek, tmp_path / "out", pipeline(tmp_path / "c.yaml"), "DeepSeek-V3")
    assert not (tmp_path / "out").exists()


def test_verify_source_tensors_accepts_quantized_linears_stacked_experts_and_consumed_tensors(tmp_path):
    """The ways an input tensor may be accounted for, on names alone."""
    out = tmp_path / "out"
    out.mkdir()
    save_file({"a.q_proj.weight": torch.zeros(2, 2, dtype=torch.int8), "a.q_proj.weight_scale": torch.ones(2, 1),
               "a.q_proj.quant_bias": torch.zeros(2, dtype=torch.int32),
               "a.k_proj.weight": torch.zeros(2, 2, dtype=torch.int8), "a.k_proj.weight_scale": torch.ones(2, 1),
               "l.experts.0.gate_proj.weight": torch.zeros(2, 2), "l.experts.0.up_proj.weight": torch.zeros(2, 2),
               "l.experts.0.down_proj.weight_packed": torch.zeros(2, 1, dtype=torch.int32),
               "l.experts.0.down_proj.weight_scale": torch.ones(2, 1),
               "model.embed_tokens.weight": torch.zeros(2, 2)}, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps({"model_type": "llama", "tie_word_embeddings": True}))
    accounted = ["a.q_proj.weight", "a.q_proj.bias", "a.q_proj.weight_scale_inv", "a.q_proj.deq_scale",
                 "a.k_proj.weight", "l.experts.gate_up_proj",
                 "l.experts.down_proj", "model.layers.0.self_attn.rotary_emb.inv_freq", "lm_head.weight",
                 "model.embed_tokens.weight"]
    verify_source_tensors(out, accounted, tmp_path)
    # a weight nobody wrote, a scale without its weight, a quantized layer's bias lost (not folded)
    with pytest.raises(FormatCheckError, match=r"lacks 3 tensor\(s\) .*\(a\.k_proj\.bias, b\.weight, "
                                               r"x\.weight_scale_inv\)"):
        verify_source_tensors(out, accounted + ["b.weight", "x.weight_scale_inv", "a.k_proj.bias"], tmp_path)
    (out / "config.json").write_text(json.dumps({"model_type": "llama"}))  # llama does not tie by default
    with pytest.raises(FormatCheckError, match=r"\(lm_head\.weight\)"):
        verify_source_tensors(out, accounted, tmp_path)


# ---- other tensors the model does not read --------------------------------------------------------------------
def with_extra_tensors(path: Path, extra: dict[str, torch.Tensor]) -> Path:
    make_tiny_model(path, "llama")
    (weights,) = path.glob("*.safetensors")
    tensors = load_file(weights)
    tensors.update(extra)
    save_file(tensors, weights, metadata={"format": "pt"})
    return path


@pytest.mark.parametrize("save", ["ascendv1_saver", "compressed_tensors"])
def test_a_stray_tensor_is_kept_and_rotary_buffers_are_named_as_not_written(tmp_path, capsys, log_lines, save):
    stray = torch.arange(12, dtype=torch.float16).reshape(3, 4)
    inv_freq = "model.layers.0.self_attn.rotary_emb.inv_freq"
    model = with_extra_tensors(tmp_path / "m", {"model.extra.weight": stray, inv_freq: torch.ones(8)})
    out = tmp_path / "out"
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"apiversion": "modelslim_v1", "spec": {
        "process": [{"type": "linear_quant", "qconfig": SCHEMES["w8a8_dynamic"], "exclude": ["lm_head"]}],
        "save": [{"type": save, "part_file_size": 0}]}}))
    run_quant(model, out, config)
    tensors = written(out)
    assert tensors["model.extra.weight"].dtype == torch.float16 and torch.equal(tensors["model.extra.weight"], stray)
    assert inv_freq not in tensors
    if save == "ascendv1_saver":
        description = json.loads((out / "quant_model_description.json").read_text())
        assert description["model.extra.weight"] == "FLOAT"
    assert any("model.extra (not read by the model config.json describes, 1 tensor(s)) is written unchanged" in line
               for line in log_lines)
    assert any("not written: 1 tensor(s), rotary inv_freq buffers" in line and inv_freq in line for line in log_lines)
    code, report = check(out, model, capsys)
    assert code == 0, report


def test_an_fp8_mtp_layer_is_dequantized_to_the_model_dtype(mtp_deepseek, tmp_path, capsys, log_lines):
    from test_moe import write_block_fp8

    source = tmp_path / "fp8"
    meant = write_block_fp8(mtp_deepseek, source)
    config = json.loads((source / "config.json").read_text())
    config["dtype"] = "bfloat16"  # as DeepSeek-V3 publishes it: float8 weights, bfloat16 model
    (source / "config.json").write_text(json.dumps(config))
    mtp_weight = f"{MTP_LAYER}.eh_proj.weight"
    assert f"{MTP_LAYER}.mlp.experts.0.up_proj.weight" in meant and mtp_weight in meant
    out = tmp_path / "out"
    run_quant(source, out, pipeline(tmp_path / "c.yaml"), "DeepSeek-V3")
    tensors = written(out)
    description = json.loads((out / "quant_model_description.json").read_text())
    for name in [n for n in meant if n.startswith(MTP_LAYER + ".")]:
        assert tensors[name].dtype == torch.bfloat16, name
        assert torch.equal(tensors[name], meant[name].to(torch.bfloat16)), name
        assert description[name] == "FLOAT"
    assert not any(k.endswith("_scale_inv") for k in tensors)
    # the norms of the MTP layer were bfloat16 in the checkpoint and stay so, unchanged
    assert tensors[f"{MTP_LAYER}.enorm.weight"].equal(mtp_tensors(source)[f"{MTP_LAYER}.enorm.weight"])
    assert any("block-FP8 scales, consumed when their weights were dequantized" in line and "_scale_inv" in line
               for line in log_lines)
    code, report = check(out, source, capsys)
    assert code == 0, report


def test_an_fp8_pass_through_tensor_without_scales_is_refused_before_any_weight_is_read(tmp_path, monkeypatch):
    model = with_extra_tensors(tmp_path / "m", {"model.extra.weight": torch.zeros(4, 4).to(torch.float8_e4m3fn)})
    monkeypatch.setattr(SafetensorsCheckpoint, "_read", lambda *a: pytest.fail("a weight was read"))
    with pytest.raises(InvalidModelError, match=r"model\.extra\.weight is float8 without its block scales"):
        run_quant(model, tmp_path / "out", pipeline(tmp_path / "c.yaml"))


# ---- processors that change the residual stream ---------------------------------------------------------------
def quarot_first(path: Path) -> Path:
    spec = {"runner": "layer_wise", "process": [
        {"type": "quarot"},
        {"type": "linear_quant", "qconfig": SCHEMES["w8a8_dynamic"], "exclude": ["lm_head"]}]}
    path.write_text(yaml.safe_dump({"apiversion": "modelslim_v1", "spec": spec}))
    return path


def test_quarot_with_an_mtp_layer_the_adapter_does_not_describe_is_refused_by_name(tmp_path, monkeypatch):
    """A llama checkpoint with an MTP-like layer at index num_hidden_layers: the llama structure names no MTP
    modules, so quarot cannot rotate it and says so before any weight is read."""
    mtp = {f"model.layers.2.{n}": torch.ones(64) for n in ("enorm.weight", "hnorm.weight")}
    model = with_extra_tensors(tmp_path / "m", {**mtp, "model.layers.2.eh_proj.weight": torch.zeros(64, 128)})
    monkeypatch.setattr(SafetensorsCheckpoint, "_read", lambda *a: pytest.fail("a weight was read"))
    with pytest.raises(UnsupportedError, match=r"quarot cannot rotate the multi-token-prediction layer yet: .* "
                                               r"model\.layers\.2\.\* \(3 tensors\)"):
        run_quant(model, tmp_path / "out", quarot_first(tmp_path / "c.yaml"))
    assert not (tmp_path / "out").exists()


def test_quarot_on_deepseek_rotates_its_mtp_layer(mtp_deepseek, tmp_path, capsys, log_lines):
    out = tmp_path / "out"
    run_quant(mtp_deepseek, out, pipeline(tmp_path / "c.yaml", extra=({"type": "quarot"},)), "DeepSeek-V3")
    before, after = mtp_tensors(mtp_deepseek), written(out)
    assert all(name in after for name in before)
    # eh_proj reads the rotated embedding and hidden state and writes the rotated residual stream: it must change
    eh_proj = f"{MTP_LAYER}.eh_proj.weight"
    assert not torch.allclose(after[eh_proj].float(), before[eh_proj].float())
    assert any("rotating the multi-token-prediction layer" in line for line in log_lines)
    code, report = check(out, mtp_deepseek, capsys)
    assert code == 0, report


def test_quarot_writes_a_stray_tensor_unrotated_with_a_warning(tmp_path, log_lines):
    model = with_extra_tensors(tmp_path / "m", {"model.extra.weight": torch.ones(3)})
    run_quant(model, tmp_path / "out", quarot_first(tmp_path / "c.yaml"))
    assert torch.equal(written(tmp_path / "out")["model.extra.weight"], torch.ones(3))
    assert any("model.extra is not read by the model and is written unrotated" in line for line in log_lines)


class DoubleTheMtpLayer(Processor):
    """A stand-in for a rotation: changes every MTP tensor, and records what it was given."""

    needs_calibration = False

    def __init__(self) -> None:
        self.seen: dict[str, tuple[torch.dtype, int]] = {}

    def claims(self, linear_names):
        return {}

    def after_forward(self, block_name, block):
        pass

    def changes_passthrough(self, group) -> bool:
        return group.kind == MTP

    def transform_passthrough(self, group, tensors):
        self.seen.update({n: (t.dtype, len(tensors)) for n, t in tensors.items()})
        return {n: t * 2 for n, t in tensors.items()}


class RecordingWriter:
    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def add_passthrough(self, name, tensor) -> None:
        self.tensors[name] = tensor


def test_a_processor_transforms_a_whole_group_in_float32_and_it_is_written_in_its_dtype(mtp_deepseek):
    adapter = create_adapter("DeepSeek-V3", str(mtp_deepseek), False)
    unread = adapter.unread_tensors(adapter.init_skeleton())
    (group,) = unread.passthrough
    assert (group.name, group.kind, len(group.tensors)) == (MTP_LAYER, MTP, 32)
    processor, writer = DoubleTheMtpLayer(), RecordingWriter()
    write_passthrough(adapter, unread, [processor], writer)
    source = mtp_tensors(mtp_deepseek)
    assert set(processor.seen) == set(source) and {v for v in processor.seen.values()} == {(torch.float32, 32)}
    for name, tensor in source.items():
        assert writer.tensors[name].dtype == torch.bfloat16 and torch.equal(writer.tensors[name], tensor * 2), name
    # the default: copied as stored, each tensor written before the next is read (memory: one tensor)
    events, read = [], adapter.read_unread
    adapter.read_unread = lambda name: events.append(("read", name)) or read(name)
    unchanged = RecordingWriter()
    unchanged.add_passthrough = lambda name, tensor: events.append(("write", name)) or unchanged.tensors.update(
        {name: tensor})
    write_passthrough(adapter, unread, [], unchanged)
    assert all(unchanged.tensors[n].equal(t) for n, t in source.items())
    assert events == [(kind, n) for n in group.tensors for kind in ("read", "write")]
