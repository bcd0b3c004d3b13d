"""Every configuration in docs/examples runs as written (its own dataset name, its own savers) on a tiny Llama
through the CLI, and what it saves reads back with the layer types the example promises: the ascendv1 output
through our reader and, independently, tests/reference_reader.py (the same logits), the compressed-tensors output
through transformers; every reading is near the float model (a 4-bit tiny random model loses up to ~35 % of
its logits' norm; a wrong reading loses more than all of it)."""
import json
from pathlib import Path

import pytest
import torch
from reference_reader import load_reference_model

from msmodelslim.cli.__main__ import main
from msmodelslim.core.config import load_config
from msmodelslim.format.fan_out import SUBFOLDERS

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "docs" / "examples").glob("*.yaml"))

# What each example gives model.layers.0's q_proj and down_proj in quant_model_description.json (ascendv1).
ASCENDV1_TYPES = {
    "flex_smooth_w8a8_static.yaml": ("W8A8", "W8A8_DYNAMIC"),
    "fp8_dynamic.yaml": ("W8A8FP8_DYNAMIC", "W8A8FP8_DYNAMIC"),
    "mixed_group.yaml": ("W8A8", "W8A8_DYNAMIC"),
    "quarot_w4a8_dynamic.yaml": ("W4A8_DYNAMIC", "W4A8_DYNAMIC"),
    "smooth_w8a8_static.yaml": ("W8A8", "W8A8_DYNAMIC"),
    "w4a16_group64.yaml": ("W4A16", "W4A16"),
    "w4a16_mxfp4.yaml": ("W4A16_MXFP4", "W4A16_MXFP4"),
    "w8a16.yaml": ("W8A16", "W8A16"),
    "w8a8_dynamic.yaml": ("W8A8_DYNAMIC", "W8A8_DYNAMIC"),
    "w8a8_mxfp8.yaml": ("W8A8_MXFP8", "W8A8_MXFP8"),
    "w8a8_static.yaml": ("W8A8", "W8A8"),
}
# What each example's compressed-tensors config.json says of the decoder linears (format of their group).
COMPRESSED_TENSORS_FORMATS = {"fp8_dynamic.yaml": "float-quantized", "w4a16_mxfp4.yaml": "mxfp4-pack-quantized"}


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_every_example_is_listed():
    assert {p.name for p in EXAMPLES} == set(ASCENDV1_TYPES) | set(COMPRESSED_TENSORS_FORMATS)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_documented_example_runs_and_reads_back(tiny_llama, tmp_path, path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    code = main(["quant", "--model_path", str(tiny_llama), "--save_path", str(out), "--device", "cpu",
                 "--model_type", "Llama-2-7B", "--config_path", str(path)])
    assert code == 0
    savers = [save.type for save in load_config(path).spec.save]  # the config's savers, defaults included
    folders = {saver: out if len(savers) == 1 else out / SUBFOLDERS[saver] for saver in savers}
    assert ("ascendv1_saver" in folders) == (path.name in ASCENDV1_TYPES)
    assert ("compressed_tensors" in folders) == (path.name in COMPRESSED_TENSORS_FORMATS)

    ids = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    float_logits = logits(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval(), ids)
    if "ascendv1_saver" in folders:
        from msmodelslim.format.ascendv1.reader import load_ascendv1

        folder = folders["ascendv1_saver"]
        description = json.loads((folder / "quant_model_description.json").read_text())
        got = tuple({kind for key, kind in description.items() if key.startswith(f"model.layers.0.{name}.")}
                    for name in ("self_attn.q_proj", "mlp.down_proj"))
        assert got == tuple({kind} for kind in ASCENDV1_TYPES[path.name])
        ours = logits(load_ascendv1(folder), ids)
        assert relative_error(ours, logits(load_reference_model(folder), ids)) < 1e-4
        assert relative_error(ours, float_logits) < 0.5
    if "compressed_tensors" in folders:
        from transformers.utils.quantization_config import CompressedTensorsConfig

        folder = folders["compressed_tensors"]
        config = json.loads((folder / "config.json").read_text())["quantization_config"]
        assert {group["format"] for group in config["config_groups"].values()} == {COMPRESSED_TENSORS_FORMATS[path.name]}
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True,
                                                     quantization_config=CompressedTensorsConfig(dequantize=True))
        assert relative_error(logits(model.eval(), ids), float_logits) < 0.5
