"""Accuracy and cost of each scheme on the real SmolLM2-135M-Instruct (run by hand, not in CI).

For every scheme: quantize layer-wise on the CPU through the CLI code path, read the ascendv1 output back,
and measure perplexity on fixed windows of the Debian reference *evaluation* half. Calibration (static W8A8)
uses windows of the *calibration* half only. Prints wall time, peak RSS of the quantize step (measured in a
child process), and ratios against the float model.

    python benchmarks/smollm2_accuracy.py [--schemes w8a16,sq0.5+w8a8_static,...] [--windows 40]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CORPORA = ROOT.parent / "shared" / "corpora"

WEIGHT_INT8 = {"dtype": "int8", "scope": "per_channel", "symmetric": True, "method": "minmax"}
DYNAMIC = {"dtype": "int8", "scope": "per_token", "symmetric": True, "method": "minmax"}
STATIC = {"dtype": "int8", "scope": "per_tensor", "symmetric": False, "method": "minmax"}


def linear(qconfig: dict, include=("*",), exclude=("lm_head",)) -> dict:
    return {"type": "linear_quant", "qconfig": qconfig, "include": list(include), "exclude": list(exclude)}


def smooth(alpha: float) -> dict:
    return {"type": "smooth_quant", "alpha": alpha, "enable_subgraph_type": ["norm-linear", "ov", "up-down"]}


WEIGHT_INT4 = {**WEIGHT_INT8, "dtype": "int4"}  # per channel, as the W4A8 kernels take it
W4_G64 = {**WEIGHT_INT4, "scope": "per_group", "ext": {"group_size": 64}}
ITER = {"type": "iter_smooth"}  # alpha 0.9, all subgraphs the adapter has
FLEX = {"type": "flex_smooth_quant"}  # alpha/beta searched against dynamic int8 error
FLEX_STATIC = {"type": "flex_smooth_quant", "act_scope": "per_tensor"}  # ... against static int8 error
QUAROT = {"type": "quarot"}
GPTQ_G64 = {**W4_G64, "method": "gptq", "ext": {"group_size": 64, "act_order": True}}
AWQ_G64 = {"type": "awq", "weight_qconfig": W4_G64}  # scored with round-to-nearest
AWQ_G64_SSZ = {"type": "awq", "weight_qconfig": {**W4_G64, "method": "ssz"}}
AWQ_CHANNEL = {"type": "awq", "weight_qconfig": WEIGHT_INT4}
AR_CHANNEL = {**WEIGHT_INT4, "method": "autoround", "ext": {"scale_dtype": "float32"}}  # W4 scales are saved in f32
AR_G64 = {**W4_G64, "method": "autoround", "ext": {"group_size": 64, "scale_dtype": "float32"}}


def autoround(qconfig: dict, iters: int = 10) -> dict:
    return {"type": "autoround_quant", "iters": iters, "strategies": [{"qconfig": qconfig, "exclude": ["lm_head"]}]}


FLEX_AWQ_W4A8 = {"type": "flex_awq_ssz", "qconfig": {"act": DYNAMIC, "weight": {**WEIGHT_INT4, "method": "ssz"}}}


# W8A8S: static int8 activations, int8 weights whose bulk sits on a 4-bit grid (outliers kept in int8).
def lowbit_sparse(**ext) -> dict:
    return {**WEIGHT_INT8, "method": "lowbit_sparse", "ext": {"w_bit": 4, **ext}}


def float_sparse(ratio: float, exclude=()) -> dict:
    return {"type": "float_sparse", "sparse_ratio": ratio, "include": [], "exclude": list(exclude)}


# Static on attention and MLP inputs, down_proj dynamic (the split the established practices use).
SPLIT = {"type": "group", "configs": [linear({"act": STATIC, "weight": WEIGHT_INT8}, exclude=("lm_head", "*down_proj")),
                                      linear({"act": DYNAMIC, "weight": WEIGHT_INT8}, include=("*down_proj",))]}
SCHEMES = {
    "w8a16": [linear({"weight": WEIGHT_INT8})],
    "w8a8_dynamic": [linear({"act": DYNAMIC, "weight": WEIGHT_INT8})],
    "w8a8_static": [linear({"act": STATIC, "weight": WEIGHT_INT8})],
    "w4a16_g64": [linear({"weight": {**WEIGHT_INT8, "dtype": "int4", "scope": "per_group", "ext": {"group_size": 64}}})],
    "w4a16_channel": [linear({"weight": {**WEIGHT_INT8, "dtype": "int4"}})],
    "sq0.5+w8a8_dynamic": [smooth(0.5), linear({"act": DYNAMIC, "weight": WEIGHT_INT8})],
    "sq0.5+w8a8_static": [smooth(0.5), linear({"act": STATIC, "weight": WEIGHT_INT8})],
    "sq0.8+w8a8_static": [smooth(0.8), linear({"act": STATIC, "weight": WEIGHT_INT8})],
    "sq0.5+w8a8_static_down_dynamic": [smooth(0.5), SPLIT],
    "sq0.8+w8a8_static_down_dynamic": [smooth(0.8), SPLIT],
    "w8a8_static_down_dynamic": [SPLIT],
    "iter+w8a8_static": [ITER, linear({"act": STATIC, "weight": WEIGHT_INT8})],
    "iter+w8a8_static_down_dynamic": [ITER, SPLIT],
    "iter+w8a8_dynamic": [ITER, linear({"act": DYNAMIC, "weight": WEIGHT_INT8})],
    "flex+w8a8_dynamic": [FLEX, linear({"act": DYNAMIC, "weight": WEIGHT_INT8})],
    "flex_static+w8a8_static": [FLEX_STATIC, linear({"act": STATIC, "weight": WEIGHT_INT8})],
    "flex_static+w8a8_static_down_dynamic": [FLEX_STATIC, SPLIT],
    "w4a8_dynamic": [linear({"act": DYNAMIC, "weight": WEIGHT_INT4})],
    "quarot+w8a8_dynamic": [QUAROT, linear({"act": DYNAMIC, "weight": WEIGHT_INT8})],
    "quarot+w4a8_dynamic": [QUAROT, linear({"act": DYNAMIC, "weight": WEIGHT_INT4})],
    "quarot+flex+w8a8_dynamic": [QUAROT, FLEX, linear({"act": DYNAMIC, "weight": WEIGHT_INT8})],
    "quarot+flex+w4a8_dynamic": [QUAROT, FLEX, linear({"act": DYNAMIC, "weight": WEIGHT_INT4})],
    "quarot+flex_static+w8a8_static": [QUAROT, FLEX_STATIC, linear({"act": STATIC, "weight": WEIGHT_INT8})],
    "quarot+flex_static+w8a8_static_down_dynamic": [QUAROT, FLEX_STATIC, SPLIT],
    "w4a16_g64_gptq": [linear({"weight": {**W4_G64, "method": "gptq", "ext": {"group_size": 64, "act_order": True}}})],
    "w4a16_g64_ssz": [linear({"weight": {**W4_G64, "method": "ssz"}})],
    "w4a16_channel_gptq": [linear({"weight": {**WEIGHT_INT4, "method": "gptq", "ext": {"act_order": True}}})],
    "w4a16_channel_ssz": [linear({"weight": {**WEIGHT_INT4, "method": "ssz"}})],
    "w4a8_dynamic_gptq": [linear({"act": DYNAMIC, "weight": {**WEIGHT_INT4, "method": "gptq", "ext": {"act_order": True}}})],
    "quarot+w4a8_dynamic_gptq": [QUAROT, linear({"act": DYNAMIC,
                                                 "weight": {**WEIGHT_INT4, "method": "gptq", "ext": {"act_order": True}}})],
    "awq+w4a16_g64": [AWQ_G64, linear({"weight": W4_G64})],
    "awq+w4a16_g64_gptq": [AWQ_G64, linear({"weight": GPTQ_G64})],
    "awq+w4a16_g64_ssz": [AWQ_G64_SSZ, linear({"weight": {**W4_G64, "method": "ssz"}})],
    "awq+w4a16_channel_gptq": [AWQ_CHANNEL, linear({"weight": {**WEIGHT_INT4, "method": "gptq", "ext": {"act_order": True}}})],
    "w4a8_dynamic_ssz": [linear({"act": DYNAMIC, "weight": {**WEIGHT_INT4, "method": "ssz"}})],
    "flex_awq+w4a8_dynamic_ssz": [FLEX_AWQ_W4A8, linear({"act": DYNAMIC, "weight": {**WEIGHT_INT4, "method": "ssz"}})],
    "flex_awq+w4a8_dynamic_gptq": [FLEX_AWQ_W4A8, linear({"act": DYNAMIC, "weight": {
        **WEIGHT_INT4, "method": "gptq", "ext": {"act_order": True}}})],
    "autoround_w4a16_g64": [autoround({"weight": AR_G64})],
    "autoround50_w4a16_g64": [autoround({"weight": AR_G64}, iters=50)],
    "awq+autoround_w4a16_g64": [AWQ_G64, autoround({"weight": AR_G64})],
    "autoround_w4a16_channel": [autoround({"weight": AR_CHANNEL})],
    "autoround_w4a8_dynamic": [autoround({"act": DYNAMIC, "weight": AR_CHANNEL})],
    "flex_awq+autoround_w4a8_dynamic": [FLEX_AWQ_W4A8, autoround({"act": DYNAMIC, "weight": AR_CHANNEL})],
    "w8a8_static_histogram": [linear({"act": {**STATIC, "method": "histogram"}, "weight": WEIGHT_INT8})],
    # C8: the KV cache int8 per channel (dynamic_cache); kvs = kv_smooth (smooth_factor 1) before it
    "c8": [{"type": "dynamic_cache", "qconfig": {**WEIGHT_INT8}}],
    "kvs+c8": [{"type": "kv_smooth"}, {"type": "dynamic_cache", "qconfig": {**WEIGHT_INT8}}],
    "sq0.5+w8a8_dynamic+c8": [smooth(0.5), linear({"act": DYNAMIC, "weight": WEIGHT_INT8}),
                              {"type": "dynamic_cache", "qconfig": {**WEIGHT_INT8}}],
    "sq0.5+kvs+w8a8_dynamic+c8": [smooth(0.5), {"type": "kv_smooth"}, linear({"act": DYNAMIC, "weight": WEIGHT_INT8}),
                                  {"type": "dynamic_cache", "qconfig": {**WEIGHT_INT8}}],
    "w8a8s_f0.01": [linear({"act": STATIC, "weight": lowbit_sparse(fraction=0.01)})],
    "sq0.8+w8a8s_f0.01": [smooth(0.8), linear({"act": STATIC, "weight": lowbit_sparse(fraction=0.01)})],
    "sq0.8+w8a8s_sigma3": [smooth(0.8), linear({"act": STATIC, "weight": lowbit_sparse(use_sigma=True, sigma_factor=3.0)})],
    # the established sparse practices keep every down_proj in float
    "sq0.8+w8a8s_f0.01_down_float": [smooth(0.8), linear({"act": STATIC, "weight": lowbit_sparse(fraction=0.01)},
                                                         exclude=("lm_head", "*down_proj"))],
    "sq0.8+w8a8s_f0.02_down_float": [smooth(0.8), linear({"act": STATIC, "weight": lowbit_sparse(fraction=0.02)},
                                                         exclude=("lm_head", "*down_proj"))],
    "sq0.8+w8a8s_f0.05_down_float": [smooth(0.8), linear({"act": STATIC, "weight": lowbit_sparse(fraction=0.05)},
                                                         exclude=("lm_head", "*down_proj"))],
    "sq0.8+w8a8s_sigma3_down_float": [smooth(0.8), linear({"act": STATIC, "weight": lowbit_sparse(
        use_sigma=True, sigma_factor=3.0)}, exclude=("lm_head", "*down_proj"))],
    "sq0.8+w8a8_static_down_float": [smooth(0.8), linear({"act": STATIC, "weight": WEIGHT_INT8},
                                                         exclude=("lm_head", "*down_proj"))],
    "w16a16s_0.3": [float_sparse(0.3)],
    "w16a16s_0.4": [float_sparse(0.4)],
    "w16a16s_0.5": [float_sparse(0.5)],
}
# Floating-point formats (all activations quantized at run time: per token for FP8, per block of 32 for MX).
FP8 = {"dtype": "fp8_e4m3", "symmetric": True, "method": "minmax"}
MXFP8 = {"dtype": "mxfp8", "scope": "per_block", "symmetric": True, "method": "minmax"}
MXFP4 = {**MXFP8, "dtype": "mxfp4"}
AR_FLOAT = {"method": "autoround", "ext": {"scale_dtype": "float32"}}  # FP8 scales are saved in f32
SCHEMES.update({
    "fp8_dynamic": [linear({"act": {**FP8, "scope": "per_token"}, "weight": {**FP8, "scope": "per_channel"}})],
    "w8a8_mxfp8": [linear({"act": MXFP8, "weight": MXFP8})],
    "w4a8_mxfp": [linear({"act": MXFP8, "weight": MXFP4})],
    "w4a4_mxfp4": [linear({"act": MXFP4, "weight": MXFP4})],
    "w4a16_mxfp4": [linear({"weight": MXFP4})],
    "w8a8_mxfp8_mse_round": [linear({"act": MXFP8, "weight": {**MXFP8, "method": "mse_round"}})],
    "w4a16_mxfp4_ceil_x": [linear({"weight": {**MXFP4, "method": "ceil_x"}})],
    "w4a8_mxfp_ceil_x": [linear({"act": MXFP8, "weight": {**MXFP4, "method": "ceil_x"}})],
    "w4a4_mxfp4_ceil_x": [linear({"act": MXFP4, "weight": {**MXFP4, "method": "ceil_x"}})],
    # GPTQ on the float grids (quantizer/gptq.py FloatGrid), rotations and smoothing in front
    "fp8_dynamic_gptq": [linear({"act": {**FP8, "scope": "per_token"},
                                 "weight": {**FP8, "scope": "per_channel", "method": "gptq"}})],
    "sq0.5+fp8_dynamic": [smooth(0.5), linear({"act": {**FP8, "scope": "per_token"},
                                               "weight": {**FP8, "scope": "per_channel"}})],
    "w8a8_mxfp8_gptq": [linear({"act": MXFP8, "weight": {**MXFP8, "method": "gptq"}})],
    "w4a16_mxfp4_gptq": [linear({"weight": {**MXFP4, "method": "gptq"}})],
    # AutoRound on the float grids (quantizer/autoround_float.py), 10 and 50 steps per linear
    "autoround_fp8_dynamic": [autoround({"act": {**FP8, "scope": "per_token"},
                                         "weight": {**FP8, "scope": "per_channel", **AR_FLOAT}})],
    "autoround_w8a8_mxfp8": [autoround({"act": MXFP8, "weight": {**MXFP8, **AR_FLOAT}})],
    "autoround_w4a16_mxfp4": [autoround({"weight": {**MXFP4, **AR_FLOAT}})],
    "autoround50_w4a16_mxfp4": [autoround({"weight": {**MXFP4, **AR_FLOAT}}, iters=50)],
    "w4a4_mxfp4_gptq": [linear({"act": MXFP4, "weight": {**MXFP4, "method": "gptq"}})],
    "quarot+w4a4_mxfp4": [QUAROT, linear({"act": MXFP4, "weight": MXFP4})],
    "quarot+w4a4_mxfp4_gptq": [QUAROT, linear({"act": MXFP4, "weight": {**MXFP4, "method": "gptq"}})],
    "quarot+w4a16_mxfp4_gptq": [QUAROT, linear({"weight": {**MXFP4, "method": "gptq"}})],
    # SVDQuant's recipe: smoothing, then a rank-32 float branch, the residual in MXFP4 (processor/svd_res)
    "iter_smooth+svd_res+w4a4_mxfp4": [ITER, {"type": "svd_res", "rank": 32, "exclude": ["lm_head"]},
                                       linear({"act": MXFP4, "weight": MXFP4})],
    "quarot+svd_res+w4a4_mxfp4_gptq": [QUAROT, {"type": "svd_res", "rank": 32, "exclude": ["lm_head"]},
                                       linear({"act": MXFP4, "weight": {**MXFP4, "method": "gptq"}})],
})
# W4A4 in integers (W4A4_DYNAMIC): int4 activations per token, int4 weights per channel
ACT_INT4 = {**DYNAMIC, "dtype": "int4"}
SCHEMES.update({
    "w4a4_int": [linear({"act": ACT_INT4, "weight": WEIGHT_INT4})],
    "w4a4_int_gptq": [linear({"act": ACT_INT4, "weight": {**WEIGHT_INT4, "method": "gptq"}})],
    "quarot+w4a4_int": [QUAROT, linear({"act": ACT_INT4, "weight": WEIGHT_INT4})],
    "quarot+w4a4_int_gptq": [QUAROT, linear({"act": ACT_INT4, "weight": {**WEIGHT_INT4, "method": "gptq"}})],
    # the LAOS recipe's quantization (qwen3-w4a4 practice) with the protocol's 10 AutoRound steps instead of 400:
    # W4A4_DYNAMIC gate/up, W8A8_DYNAMIC attention and down_proj
    "laos_mix": [{"type": "autoround_quant", "iters": 10, "strategies": [
        {"qconfig": {"act": DYNAMIC, "weight": {**WEIGHT_INT8, "method": "autoround"}},
         "include": ["*self_attn*", "*.down_proj"]},
        {"qconfig": {"act": ACT_INT4, "weight": {**WEIGHT_INT4, "method": "autoround"}},
         "include": ["*.up_proj", "*.gate_proj"]}]}],
})
DEFAULT_SCHEMES = "w8a16,w8a8_dynamic,w8a8_static,w4a16_g64,w4a16_channel"


def calibration_windows(tokenizer, count: int, length: int, out: Path) -> Path:
    """`count` windows of `length` tokens spread evenly over the calibration half (they overlap)."""
    ids = tokenizer(CORPORA.joinpath("debian-reference.calib.txt").read_text(), return_tensors="pt")["input_ids"][0]
    starts = torch.linspace(0, len(ids) - length, count).long().tolist()
    with out.open("w") as f:
        for s in starts:
            f.write(json.dumps({"text": tokenizer.decode(ids[s : s + length])}) + "\n")
    return out


def weight_zeros(out: Path) -> str:
    """Share of zero weights (int8 codes or pruned floats) per type over the quantized linears of `out`."""
    from safetensors import safe_open

    description = json.loads((out / "quant_model_description.json").read_text())
    zeros: dict[str, list[int]] = {}
    for file in sorted(out.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for key in f.keys():
                tag = description.get(key)
                if key.endswith(".weight") and tag not in (None, "FLOAT"):
                    w = f.get_tensor(key)
                    counts = zeros.setdefault(tag, [0, 0])
                    counts[0] += int((w == 0).sum())
                    counts[1] += w.numel()
    return ", ".join(f"{tag} zero weights {z / n:.4f}" for tag, (z, n) in sorted(zeros.items()))


def write_config(path: Path, process: list, dataset: str, runner: str, saver: str = "ascendv1_saver",
                 calibration: dict | None = None, prior: list | None = None) -> None:
    """`saver`: one saver type, or several joined by "+" (one run writes each into its own subfolder).
    `calibration`: spec.calibration, when not the defaults. `prior`: spec.prior's stages, when any."""
    import yaml

    config = {"apiversion": "modelslim_v1", "spec": {
        "runner": runner,
        **({"prior": prior} if prior else {}),
        "process": process,
        "save": [{"type": kind, "part_file_size": 4} for kind in saver.split("+")],
        "dataset": dataset}}
    if calibration:
        config["spec"]["calibration"] = calibration
    path.write_text(yaml.safe_dump(config))


def quantize_in_child(model_dir: Path, config: Path, out: Path, model_type: str = "SmolLM2-135M-Instruct",
                      device: str = "cpu") -> tuple[float, float]:
    """Run the real CLI in a child process: wall seconds and the peak RSS (MiB) of the child or, with several
    CPU ranks (`device` cpu:0,1), of the largest rank it spawned."""
    code = (
        "import resource, sys; from msmodelslim.cli.__main__ import main; rc = main(sys.argv[1:]); "
        "print('PEAK_RSS_KIB', max(resource.getrusage(w).ru_maxrss for w in "
        "(resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))); sys.exit(rc)"
    )
    args = [sys.executable, "-c", code, "quant", "--model_path", str(model_dir), "--save_path", str(out),
            "--device", device, "--model_type", model_type, "--config_path", str(config), "--overwrite"]
    started = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, env={**__import__("os").environ,
                                                                      "MSMODELSLIM_LOG_LEVEL": "warning"})
    seconds = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(f"quantization failed:\n{proc.stderr[-3000:]}")
    rss = next(int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("PEAK_RSS_KIB"))
    return seconds, rss / 1024


def main() -> None:
    from transformers import AutoTokenizer

    from msmodelslim.app.evaluate import load_float_model, perplexity, token_windows
    from msmodelslim.core.dataset import read_texts
    from msmodelslim.format.ascendv1.reader import load_ascendv1
    from msmodelslim.model.gguf_import import convert_gguf, find_gguf

    parser = argparse.ArgumentParser()
    parser.add_argument("--schemes", default=DEFAULT_SCHEMES, help=f"comma-separated, from: {', '.join(SCHEMES)}")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--calib_samples", type=int, default=128)
    parser.add_argument("--runner", default="layer_wise", choices=["layer_wise", "model_wise"])
    parser.add_argument("--work_dir", type=Path, default=Path.home() / ".cache" / "msmodelslim" / "bench")
    parser.add_argument("--float_ppl", type=float, default=None,
                        help="the float model's perplexity on the same windows, from an earlier run (skips it)")
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(torch.get_num_threads())

    model_dir = convert_gguf(find_gguf(), Path.home() / ".cache" / "msmodelslim" / "demo" / "SmolLM2-135M-Instruct")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    windows = token_windows(tokenizer, read_texts(CORPORA / "debian-reference.eval.txt"), 512, args.windows)
    if args.float_ppl is None:
        float_ppl = perplexity(load_float_model(model_dir, False), windows, torch.device("cpu"), "float")
    else:
        float_ppl = argparse.Namespace(perplexity=args.float_ppl)
    print(f"float: ppl {float_ppl.perplexity:.4f} on {len(windows)} x 512 tokens of the eval half", flush=True)
    calib = calibration_windows(tokenizer, args.calib_samples, 512, args.work_dir / "calib_windows.jsonl")

    rows = []
    for name in args.schemes.split(","):
        config = args.work_dir / f"{name}.yaml"
        write_config(config, SCHEMES[name], str(calib), args.runner)
        out = args.work_dir / f"smollm2-{name}"
        seconds, rss = quantize_in_child(model_dir, config, out)
        ppl = perplexity(load_ascendv1(out), windows, torch.device("cpu"), name)
        rows.append((name, ppl.perplexity, seconds, rss))
        print(f"{name}: ppl {ppl.perplexity:.4f} (x{ppl.perplexity / float_ppl.perplexity:.4f} of float), "
              f"quantize {seconds:.1f} s, peak RSS {rss:.0f} MiB; {weight_zeros(out)}", flush=True)

    print(f"\n| scheme ({args.runner}) | perplexity | vs float | quantize wall s | quantize peak RSS MiB |")
    print("|---|---|---|---|---|")
    print(f"| float (fp32) | {float_ppl.perplexity:.4f} | 1.0000 | - | - |")
    for name, ppl, seconds, rss in rows:
        print(f"| {name} | {ppl:.4f} | {ppl / float_ppl.perplexity:.4f} | {seconds:.1f} | {rss:.0f} |")


if __name__ == "__main__":
    main()
