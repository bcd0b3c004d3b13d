"""msmodelslim and llm-compressor on the same model, calibration samples, sequence length and evaluation
windows, measured in one run (run by hand, not in CI).

llm-compressor lives in its own environment, never in the project's dependencies:
    python3 -m venv /tmp/lcvenv && /tmp/lcvenv/bin/pip install torch==2.13.0 llmcompressor
    python benchmarks/side_by_side.py --peer_python /tmp/lcvenv/bin/python [--pairs rtn_dynamic,dynamic,static,static_split]
        [--calibration_precision float32|bfloat16|auto]

Both tools quantize SmolLM2-135M-Instruct (float32) with 128 windows of 512 tokens from the calibration half;
perplexity is taken on 40 x 512 tokens of the evaluation half. The quantize wall time counts model loading
and calibration; for msmodelslim also writing the checkpoint (llm-compressor's recipe runs in memory).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from smollm2_accuracy import CORPORA, SCHEMES, calibration_windows, quantize_in_child, write_config  # noqa: E402

PAIRS = {  # name: (ours, peer), the same scheme family, ours with its best processors
    "rtn_dynamic": ("w8a8_dynamic", "rtn_w8a8_dynamic"),
    "dynamic": ("sq0.5+w8a8_dynamic", "sq0.8_gptq_w8a8_dynamic"),
    # static per-tensor asymmetric activations on all linears
    "static": ("sq0.8+w8a8_static", "sq0.8_gptq_w8a8_static"),
    # static on attention/MLP inputs, down_proj dynamic per token
    "static_split": ("sq0.8+w8a8_static_down_dynamic", "sq0.8_gptq_w8a8_static_down_dynamic"),
}


def protocol(work_dir: Path, windows: int, calib_windows: int = 128, float_ppl: float | None = None):
    """The side-by-side protocol's inputs: (float checkpoint, eval text, eval windows, float perplexity,
    calibration file of `calib_windows` x 512 tokens of the calibration half). `float_ppl`: the float model's
    perplexity on the same windows from an earlier run (skips computing it)."""
    from transformers import AutoTokenizer

    from msmodelslim.app.evaluate import load_float_model, perplexity, token_windows
    from msmodelslim.core.dataset import read_texts
    from msmodelslim.model.gguf_import import convert_gguf, find_gguf

    model_dir = convert_gguf(find_gguf(), Path.home() / ".cache" / "msmodelslim" / "demo" / "SmolLM2-135M-Instruct")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    eval_path = CORPORA / "debian-reference.eval.txt"
    eval_windows = token_windows(tokenizer, read_texts(eval_path), 512, windows)
    if float_ppl is None:
        float_ppl = perplexity(load_float_model(model_dir, False), eval_windows, torch.device("cpu"), "float").perplexity
    calib = calibration_windows(tokenizer, calib_windows, 512, work_dir / f"calib_windows_{calib_windows}.jsonl")
    print(f"float ppl {float_ppl:.4f}", flush=True)
    return model_dir, eval_path, eval_windows, float_ppl, calib


def run_peer(peer_python: Path, model_dir: Path, calib: Path, eval_path: Path, recipe: str, windows: int,
             save: Path | None = None) -> dict:
    """One llm-compressor recipe in its own environment: {ppl, seconds, peak_rss_mib}; `save`: where it also writes
    its compressed-tensors checkpoint (after the timed part)."""
    command = [str(peer_python), str(Path(__file__).with_name("llmcompressor_worker.py")), "--model", str(model_dir),
               "--calib", str(calib), "--eval", str(eval_path), "--recipe", recipe, "--windows", str(windows)]
    proc = subprocess.run(command + (["--save", str(save)] if save is not None else []), capture_output=True,
                          text=True)
    if proc.returncode:
        raise SystemExit(f"llm-compressor run {recipe} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:

    from msmodelslim.app.evaluate import perplexity
    from msmodelslim.format.ascendv1.reader import load_ascendv1

    parser = argparse.ArgumentParser()
    parser.add_argument("--peer_python", type=Path, required=True, help="python of llm-compressor's environment")
    parser.add_argument("--work_dir", type=Path, default=Path.home() / ".cache" / "msmodelslim" / "side_by_side")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--pairs", default="rtn_dynamic,dynamic", help=f"comma-separated, from: {', '.join(PAIRS)}")
    parser.add_argument("--calibration_precision", choices=("float32", "bfloat16", "auto"), default="float32",
                        help="our spec.calibration.precision (bfloat16: range-only forwards under autocast; auto: "
                             "bfloat16 where the CPU has bfloat16 units; llm-compressor runs float32 either way)")
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)

    model_dir, eval_path, windows, float_ppl, calib = protocol(args.work_dir, args.windows)

    rows = []
    for pair in args.pairs.split(","):
        ours, peer = PAIRS[pair]
        tag = ours if args.calibration_precision == "float32" else f"{ours}.{args.calibration_precision}"
        config = args.work_dir / f"{tag}.yaml"
        calibration = None if args.calibration_precision == "float32" else {"precision": args.calibration_precision}
        write_config(config, SCHEMES[ours], str(calib), "layer_wise", calibration=calibration)
        out = args.work_dir / f"smollm2-{tag}"
        seconds, rss = quantize_in_child(model_dir, config, out)
        ppl = perplexity(load_ascendv1(out), windows, torch.device("cpu"), ours).perplexity
        print(f"msmodelslim {ours}: ppl {ppl:.4f}, {seconds:.1f} s, {rss:.0f} MiB", flush=True)
        result = run_peer(args.peer_python, model_dir, calib, eval_path, peer, args.windows)
        print(f"llm-compressor {peer}: ppl {result['ppl']:.4f}, {result['seconds']:.1f} s, "
              f"{result['peak_rss_mib']:.0f} MiB", flush=True)
        rows.append((tag, ppl, seconds, rss, peer, result))

    print("\n| msmodelslim | ppl (vs float) | wall s | RSS MiB | llm-compressor | ppl (vs float) | wall s | RSS MiB "
          "| ppl ratio ours/peer | time ratio ours/peer |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for ours, ppl, seconds, rss, peer, r in rows:
        print(f"| {ours} | {ppl:.4f} (x{ppl / float_ppl:.4f}) | {seconds:.1f} | {rss:.0f} | {peer} | "
              f"{r['ppl']:.4f} (x{r['ppl'] / float_ppl:.4f}) | {r['seconds']:.1f} | {r['peak_rss_mib']:.0f} | "
              f"{ppl / r['ppl']:.4f} | {seconds / r['seconds']:.3f} |")


if __name__ == "__main__":
    main()
