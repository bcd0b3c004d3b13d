"""`apiversion: modelslim_convert` on the real SmolLM2-135M-Instruct (run by hand, not in CI).

A block-FP8 copy of the model is written first (DeepSeek-V3's layout: every decoder linear in float8_e4m3fn with a
float32 `weight_scale_inv` per 128 x 128 block, amax / 448; the other tensors in bfloat16; config.json's
quantization_config names it), standing in for a published FP8 checkpoint. Then, each through the real command
line in a child process (wall time and peak RSS from /usr/bin/time):
- float32 -> W8A8_MXFP8 by `modelslim_convert`, and by `quant` with a data-free W8A8 MXFP8 linear_quant (the same
  bytes are expected for the linears; both timed);
- FP8 block -> bf16 (Hugging Face output), FP8 block -> W8A8_MXFP8 (route FP8_BLOCK -> FLOAT -> W8A8_MXFP8).
Perplexity on 40 x 512 tokens of the evaluation half: Hugging Face outputs loaded by transformers, ascendv1
outputs by our reader (activations MXFP8 per block of 32 at run time, as the kernel). No peer converts offline
between these formats, so the rows compare against float only.

    python benchmarks/convert_smollm2.py --float_ppl 17.3552
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from side_by_side import protocol  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LINEARS = ["model.layers.*.self_attn.*_proj", "model.layers.*.mlp.*_proj"]
MXFP8 = {"dtype": "mxfp8", "scope": "per_block", "symmetric": True, "method": "minmax"}
BLOCK = 128


def write_fp8_block(source: Path, target: Path) -> Path:
    from safetensors.torch import load_file, save_file

    if (target / "config.json").is_file():
        return target
    target.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        if file.is_file() and not file.name.endswith(".safetensors") and not file.name.startswith("."):
            shutil.copyfile(file, target / file.name)
    tensors = {}
    for name, tensor in load_file(source / "model.safetensors").items():
        if name.startswith("model.layers.") and name.endswith("_proj.weight"):
            rows, cols = tensor.shape
            padded = torch.zeros(math.ceil(rows / BLOCK) * BLOCK, math.ceil(cols / BLOCK) * BLOCK)
            padded[:rows, :cols] = tensor.float()
            blocks = padded.view(padded.shape[0] // BLOCK, BLOCK, padded.shape[1] // BLOCK, BLOCK)
            scale = blocks.abs().amax(dim=(1, 3)) / 448
            codes = (blocks / scale[:, None, :, None]).view_as(padded)[:rows, :cols].to(torch.float8_e4m3fn)
            tensors[name], tensors[name.replace(".weight", ".weight_scale_inv")] = codes.contiguous(), scale
        else:
            tensors[name] = tensor.to(torch.bfloat16)
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((target / "config.json").read_text())
    config["dtype"] = "bfloat16"
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [BLOCK, BLOCK]}
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return target


def timed(argv: list[str]) -> tuple[float, float]:
    """(wall s, peak RSS MiB) of a child under /usr/bin/time -v."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "PYTHONPATH": str(ROOT),
           "MSMODELSLIM_LOG_LEVEL": "warning"}
    done = subprocess.run(["/usr/bin/time", "-v", *argv], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)[1]) / 1024
    clock = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", done.stderr)
    return int(clock[1] or 0) * 3600 + int(clock[2]) * 60 + float(clock[3]), rss


def quant(model: Path, out: Path, config: Path, *extra: str) -> tuple[float, float]:
    shutil.rmtree(out, ignore_errors=True)
    return timed([sys.executable, "-m", "msmodelslim", "quant", "--model_path", str(model), "--save_path", str(out),
                  "--device", "cpu", "--config_path", str(config), *extra])


def convert_config(path: Path, target: str, save: str) -> Path:
    path.write_text(yaml.safe_dump({"apiversion": "modelslim_convert", "spec": {
        "linears": [{"match": LINEARS, "target": target, "route": "auto"}],
        "save": [{"type": save, "part_file_size": 4}]}}))
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--float_ppl", type=float, default=None)
    parser.add_argument("--work_dir", type=Path, default=None)
    args = parser.parse_args()
    from msmodelslim.app.evaluate import load_float_model, perplexity
    from msmodelslim.format.ascendv1.reader import load_ascendv1
    from msmodelslim.format.read_back import read_tensors

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="convert-smollm2-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir, _, windows, float_ppl, _ = protocol(work, 40, 8, args.float_ppl)
    fp8 = write_fp8_block(model_dir, Path.home() / ".cache" / "msmodelslim" / "convert" / "SmolLM2-135M-fp8-block")
    quant_config = work / "quant_mxfp8.yaml"
    quant_config.write_text(yaml.safe_dump({"apiversion": "modelslim_v1", "spec": {
        "process": [{"type": "linear_quant", "include": LINEARS, "qconfig": {"weight": MXFP8, "act": MXFP8}}],
        "save": [{"type": "ascendv1_saver", "part_file_size": 4}]}}))
    runs = [  # (row, source, output, command's extra arguments, how it is read)
        ("float32 -> W8A8_MXFP8, modelslim_convert", model_dir, "convert_mxfp8",
         ["--model_type", "Llama-2-7B"], convert_config(work / "to_mxfp8.yaml", "W8A8_MXFP8", "ascend_v1"), "ascendv1"),
        ("float32 -> W8A8_MXFP8, quant (data-free linear_quant)", model_dir, "quant_mxfp8",
         ["--model_type", "Llama-2-7B"], quant_config, "ascendv1"),
        ("FP8 block -> bf16 (huggingface)", fp8, "fp8_bf16", [], convert_config(work / "to_bf16.yaml", "FLOAT", "hf"),
         "transformers"),
        ("FP8 block -> W8A8_MXFP8 (via FLOAT)", fp8, "fp8_mxfp8", [],
         convert_config(work / "fp8_to_mxfp8.yaml", "W8A8_MXFP8", "ascend_v1"), "ascendv1"),
    ]
    rows = []
    for label, source, folder, extra, config, reader in runs:
        out = work / folder
        wall, rss = quant(source, out, config, *extra)
        model = load_ascendv1(out) if reader == "ascendv1" else load_float_model(out, False)
        ppl = perplexity(model, windows, torch.device("cpu"), folder).perplexity
        del model
        rows.append((label, wall, rss, ppl))
        print(f"{label}: {wall:.1f} s, {rss:.0f} MiB, ppl {ppl:.4f} (x{ppl / float_ppl:.4f})", flush=True)
    converted, quantized = read_tensors(work / "convert_mxfp8"), read_tensors(work / "quant_mxfp8")
    same = converted.keys() == quantized.keys() and all(torch.equal(converted[k], quantized[k]) for k in quantized)
    print(f"\nfloat ppl {float_ppl:.4f}; convert and quant MXFP8 outputs tensor-identical: {same}")
    print("| run | wall s | peak RSS MiB | perplexity | x float |")
    print("|---|---|---|---|---|")
    for label, wall, rss, ppl in rows:
        print(f"| {label} | {wall:.1f} | {rss:.0f} | {ppl:.4f} | {ppl / float_ppl:.4f} |")


if __name__ == "__main__":
    main()
