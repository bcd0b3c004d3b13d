"""Data-free runs read bf16/fp16 blocks as stored, without a float32 copy of every weight (issue #26, item 6).

model_wise loads every weight widened to float32, so its output is the reference: layer_wise, which now keeps
the blocks in the checkpoint's dtype when no processor computes with them, must write the same bytes."""
from pathlib import Path

import pytest
import torch
import yaml

from helpers import SCHEMES, run_quant, small_calib
from msmodelslim.core.runner import blocks_as_stored
from msmodelslim.format.staging import MARKER
from msmodelslim.model.transformers_model import TransformersModel
from msmodelslim.processor.base import PROCESSORS, ProcessorContext
from msmodelslim.processor.linear_quant.config import LinearQuantConfig
from msmodelslim.processor.linear_quant.processor import quantization_source
from msmodelslim.quantizer.scheme import QConfig
from tiny_models import make_tiny_model

FP8 = {"dtype": "fp8_e4m3", "symmetric": True, "method": "minmax"}
MXFP4 = {"dtype": "mxfp4", "scope": "per_block", "symmetric": True, "method": "minmax"}
NVFP4 = {"dtype": "nvfp4", "scope": "per_block", "symmetric": True, "method": "minmax"}
ASCEND = {"type": "ascendv1_saver", "part_file_size": 4}
COMPRESSED = {"type": "compressed_tensors", "part_file_size": 4}
CASES = {  # scheme -> (qconfig, savers)
    "w8a8_dynamic": (SCHEMES["w8a8_dynamic"], [ASCEND, COMPRESSED]),
    "w8a16_asym_g16": (SCHEMES["w8a16_asym_g16"], [ASCEND, COMPRESSED]),
    "w4a16_g16": (SCHEMES["w4a16_g16"], [ASCEND, COMPRESSED]),
    "w4a8_dynamic": (SCHEMES["w4a8_dynamic"], [ASCEND]),  # scale_bias is computed from the dequantized weight
    "fp8_dynamic": ({"act": {**FP8, "scope": "per_token"}, "weight": {**FP8, "scope": "per_channel"}},
                    [ASCEND, COMPRESSED]),
    "w4a16_mxfp4": ({"weight": MXFP4}, [ASCEND]),
    "w4a16_nvfp4": ({"weight": NVFP4}, [COMPRESSED]),  # fused groups share max|W| read from the stored weight
    "w8a8_ssz": ({"act": SCHEMES["w8a8_dynamic"]["act"], "weight": {**SCHEMES["w8a16"]["weight"], "method": "ssz"}},
                 [ASCEND]),
}


@pytest.fixture(scope="module")
def half_models(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """bf16 Qwen2 (q/k/v biases, untied head) and fp16 Llama, saved in their half dtype."""
    return {"bf16_qwen2": (make_tiny_model(tmp_path_factory.mktemp("qwen2_bf16"), "qwen2", dtype=torch.bfloat16),
                           "Qwen2.5-7B-Instruct"),
            "fp16_llama": (make_tiny_model(tmp_path_factory.mktemp("llama_fp16"), "llama", dtype=torch.float16),
                           "Llama-2-7B")}


def write_config(path: Path, runner: str, qconfig: dict, save: list[dict]) -> Path:
    process = [{"type": "linear_quant", "qconfig": qconfig, "include": ["*"], "exclude": ["lm_head"]}]
    path.write_text(yaml.safe_dump({"apiversion": "modelslim_v1", "spec": {"runner": runner, "process": process,
                                                                           "save": save}}))
    return path


def files(out: Path) -> dict[str, bytes]:
    """Every output file but the run marker and the copy of the config (which names the runner)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != MARKER and p.suffix != ".yaml"}


@pytest.mark.parametrize("model", ["bf16_qwen2", "fp16_llama"])
@pytest.mark.parametrize("scheme", list(CASES))
def test_stored_blocks_write_the_bytes_of_widened_ones(half_models, model, scheme, tmp_path, monkeypatch):
    source, model_type = half_models[model]
    qconfig, savers = CASES[scheme]
    block_dtypes = []
    original = TransformersModel.load_block

    def load_block(self, model, name, device, as_stored=False):
        block = original(self, model, name, device, as_stored)
        block_dtypes.append({p.dtype for p in block.parameters()})
        return block

    monkeypatch.setattr(TransformersModel, "load_block", load_block)
    outputs = {}
    for runner in ("layer_wise", "model_wise"):
        outputs[runner] = tmp_path / runner
        config = write_config(tmp_path / f"{runner}.yaml", runner, qconfig, savers)
        run_quant(source, outputs[runner], config, model_type)
    stored = torch.bfloat16 if model == "bf16_qwen2" else torch.float16
    assert block_dtypes and all(d == {stored} for d in block_dtypes), block_dtypes  # layer_wise kept them as stored
    layer, reference = files(outputs["layer_wise"]), files(outputs["model_wise"])
    assert sorted(layer) == sorted(reference) and any(n.endswith(".safetensors") for n in layer)
    for name in reference:
        assert layer[name] == reference[name], f"{name} differs from the float32-loaded run's"


def test_stored_tables_are_read_back_as_stored(tiny_qwen3_bf16_tied, tmp_path, monkeypatch):
    """The embedding and head, released during the walk, come back in bf16 only to be written."""
    seen = []
    original = TransformersModel.load_outside

    def load_outside(self, model, names, as_stored=False):
        seen.append(as_stored)
        return original(self, model, names, as_stored)

    monkeypatch.setattr(TransformersModel, "load_outside", load_outside)
    run_quant(tiny_qwen3_bf16_tied, tmp_path / "out",
              write_config(tmp_path / "c.yaml", "layer_wise", SCHEMES["w8a8_dynamic"], [ASCEND]), "Qwen3-8B")
    assert seen and all(seen)


def linear_quant(qconfig: dict):
    config = LinearQuantConfig.model_validate({"type": "linear_quant", "qconfig": qconfig})
    return PROCESSORS["linear_quant"](config, ProcessorContext())


def test_blocks_stay_widened_when_anything_computes_with_the_weights(tiny_llama, tmp_path, monkeypatch):
    """Calibration forwards (static activations, smoothing) need the float32 block: layer_wise loads it widened."""
    assert blocks_as_stored([linear_quant(SCHEMES["w8a8_dynamic"])])
    assert not blocks_as_stored([linear_quant(SCHEMES["w8a8_static"])])
    assert not blocks_as_stored([linear_quant(SCHEMES["w8a8_dynamic"]), linear_quant(SCHEMES["w8a8_static"])])
    assert not blocks_as_stored([])
    flags = []
    original = TransformersModel.load_block

    def load_block(self, model, name, device, as_stored=False):
        flags.append(as_stored)
        return original(self, model, name, device, as_stored)

    monkeypatch.setattr(TransformersModel, "load_block", load_block)
    config = tmp_path / "c.yaml"
    process = [{"type": "iter_smooth", "alpha": 0.5},
               {"type": "linear_quant", "qconfig": SCHEMES["w8a8_dynamic"], "include": ["*"], "exclude": ["lm_head"]}]
    config.write_text(yaml.safe_dump({"apiversion": "modelslim_v1", "spec": {
        "runner": "layer_wise", "process": process, "dataset": small_calib(tmp_path)}}))
    run_quant(tiny_llama, tmp_path / "out", config)
    assert flags and not any(flags)


@pytest.mark.parametrize("spec,keeps", [
    ({"dtype": "int8", "method": "minmax", "scope": "per_channel", "symmetric": True}, True),
    ({"dtype": "int4", "method": "minmax", "scope": "per_group", "symmetric": False, "ext": {"group_size": 16}}, True),
    ({"dtype": "int8", "method": "ssz", "scope": "per_channel", "symmetric": True}, False),
    ({**FP8, "scope": "per_channel"}, False),
    (MXFP4, False),
])
def test_only_integer_minmax_reads_the_stored_weight(spec, keeps):
    weight = torch.randn(32, 64).bfloat16()
    source = quantization_source(weight, QConfig.model_validate(spec))
    assert source.dtype == (torch.bfloat16 if keeps else torch.float32)
    assert torch.equal(source.float(), weight.float())
