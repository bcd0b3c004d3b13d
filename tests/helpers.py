"""Small helpers shared by the end-to-end tests."""
from __future__ import annotations

import json
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import torch
import yaml
from safetensors.torch import load_file

from msmodelslim.app.quantize import quantize
from msmodelslim.app.quantize_request import QuantizeRequest
from msmodelslim.core.device import DeviceSpec

def saved_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved checkpoint folder, its shards merged."""
    merged = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        merged.update(load_file(shard))
    return merged


def output_file_bytes(folder: Path) -> dict[str, bytes]:
    """Every output file's bytes but the run marker's (.msmodelslim.json: pid, host and time of the run)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*"))
            if p.is_file() and p.name != ".msmodelslim.json"}


W8 = {"dtype": "int8", "scope": "per_channel", "symmetric": True, "method": "minmax"}
SCHEMES = {
    "w8a8_static": {"act": {"dtype": "int8", "scope": "per_tensor", "symmetric": False, "method": "minmax"}, "weight": W8},
    "w8a8_dynamic": {"act": {"dtype": "int8", "scope": "per_token", "symmetric": True, "method": "minmax"}, "weight": W8},
    "w8a8_dynamic_g16": {"act": {"dtype": "int8", "scope": "per_token", "symmetric": True, "method": "minmax"},
                         "weight": {**W8, "scope": "per_group", "ext": {"group_size": 16}}},
    "w8a16": {"weight": W8},
    "w8a16_asym_g16": {"weight": {**W8, "symmetric": False, "scope": "per_group", "ext": {"group_size": 16}}},
    "w4a16_g16": {"weight": {**W8, "dtype": "int4", "scope": "per_group", "ext": {"group_size": 16}}},
    "w4a16_channel": {"weight": {**W8, "dtype": "int4"}},
    "w4a8_dynamic": {"act": {"dtype": "int8", "scope": "per_token", "symmetric": True, "method": "minmax"},
                     "weight": {**W8, "dtype": "int4"}},
    "w4a4_dynamic": {"act": {"dtype": "int4", "scope": "per_token", "symmetric": True, "method": "minmax"},
                     "weight": {**W8, "dtype": "int4"}},
}
MODEL_TYPE = {"llama": "Llama-2-7B", "qwen2": "Qwen2.5-7B-Instruct", "qwen3": "Qwen3-8B"}


def write_config(path: Path, qconfig: dict, runner: str = "layer_wise", exclude=("lm_head",), dataset: str | None = None,
                 part_file_size: float = 4) -> Path:
    spec = {"runner": runner,
            "process": [{"type": "linear_quant", "qconfig": qconfig, "include": ["*"], "exclude": list(exclude)}],
            "save": [{"type": "ascendv1_saver", "part_file_size": part_file_size}]}
    if dataset:
        spec["dataset"] = dataset
    path.write_text(yaml.safe_dump({"apiversion": "modelslim_v1", "spec": spec}))
    return path


def write_pipeline(path: Path, process: list, dataset: str | None = None, runner: str = "layer_wise",
                   calibration: dict | None = None) -> Path:
    """A modelslim_v1 config of these spec.process steps (default saver), with spec.dataset and spec.calibration
    when given."""
    spec = {"runner": runner, "process": process}
    if dataset:
        spec["dataset"] = dataset
    if calibration is not None:
        spec["calibration"] = calibration
    path.write_text(yaml.safe_dump({"apiversion": "modelslim_v1", "spec": spec}))
    return path


def run_quant(model: Path, out: Path, config: Path, model_type: str = "Llama-2-7B",
              device: DeviceSpec = DeviceSpec("cpu"), **kwargs):
    return quantize(QuantizeRequest(model_path=model, save_path=out, model_type=model_type, device=device,
                                    config_path=config, **kwargs))



def small_calib(tmp_path: Path) -> str:
    """A short calibration set keeps the tests fast; the shipped set is exercised by the CLI tests."""
    path = tmp_path / "calib.jsonl"
    lines = [{"text": f"Sample {i}: quantization maps floats to integers; apt installs package {i} on Debian."}
             for i in range(6)]
    path.write_text("\n".join(json.dumps(x) for x in lines))
    return str(path)


STATIC_W8A8_STEP = {"type": "linear_quant", "qconfig": SCHEMES["w8a8_static"], "exclude": ["lm_head"]}


def quantize_variants(source: Path, tmp_path: Path, process: list[dict], model_type: str,
                      variants: dict[str, tuple[str, DeviceSpec]], dataset: str | None = None,
                      calibration: dict | None = None) -> dict[str, Path]:
    """Quantize the same pipeline once per variant (name -> runner, device); each variant's output directory.
    `calibration`: the spec.calibration section, when the test needs one."""
    dataset = dataset or small_calib(tmp_path)
    outputs = {}
    for name, (runner, device) in variants.items():
        config = tmp_path / f"{name}.yaml"
        spec = {"runner": runner, "process": process, "dataset": dataset}
        if calibration is not None:
            spec["calibration"] = calibration
        config.write_text(yaml.safe_dump({"apiversion": "modelslim_v1", "spec": spec}))
        outputs[name] = tmp_path / name
        quantize(QuantizeRequest(model_path=source, save_path=outputs[name], model_type=model_type, device=device,
                                 config_path=config))
    return outputs


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*.safetensors")}


def outputs_of_both_runners(source: Path, tmp_path: Path, process: list[dict], model_type: str) -> list[dict]:
    """Quantize with layer_wise and with model_wise; the bytes of every safetensors file of each output."""
    cpu = DeviceSpec("cpu")
    outs = quantize_variants(source, tmp_path, process, model_type,
                             {"layer_wise": ("layer_wise", cpu), "model_wise": ("model_wise", cpu)})
    return [shard_bytes(out) for out in outs.values()]


@contextmanager
def mounted_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A real small file system at `path` (a mount point, or a disk that fills up); skips without root."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]).returncode != 0:
        pytest.skip("tmpfs mount not permitted here")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)])
