"""`msmodelslim tune` on the real SmolLM2-135M-Instruct (run by hand, not in CI; wrap it in flock, it is heavy).

The template is W8A8 static on every decoder linear (int8 per-tensor asymmetric activations, int8 per-channel
weights, minmax, no smoothing); the demand is the built-in perplexity ratio <= --max_ratio; binary_fallback ranks
the candidates with `analyze` (--metric). Data:

  calibration half of the Debian reference  cut into consecutive, non-overlapping windows of 512 tokens, one
                                            sample each; tune holds out the last quarter of them (its default
                                            evaluation text) and calibrates on the rest
  evaluation half                           only for the final figure: 40 x 512 windows, as
                                            benchmarks/smollm2_accuracy.py measures

    flock /tmp/heavy.lock python benchmarks/tune_smollm2.py [--work_dir DIR] [--max_ratio 1.02] [--metric kurtosis]
        [--chunks 48] [--max_windows 12]

A second run with the same --work_dir reuses the tune history (cached accuracies) and reports 0 new evaluations.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
CORPORA = ROOT.parent / "shared" / "corpora"
W8 = {"dtype": "int8", "scope": "per_channel", "symmetric": True, "method": "minmax"}
STATIC = {"dtype": "int8", "scope": "per_tensor", "symmetric": False, "method": "minmax"}


def calibration_chunks(tokenizer, length: int, count: int, out: Path) -> int:
    """`count` windows of `length` tokens spread evenly over the calibration half, in order and without overlap
    (all of it when `count` is 0), one JSONL sample each. Returns how many."""
    ids = tokenizer(CORPORA.joinpath("debian-reference.calib.txt").read_text(), return_tensors="pt")["input_ids"][0]
    fits = len(ids) // length
    count = min(count or fits, fits)
    stride = len(ids) // count  # >= length: consecutive windows never overlap
    with out.open("w") as f:
        for i in range(count):
            f.write(json.dumps({"text": tokenizer.decode(ids[i * stride : i * stride + length])}) + "\n")
    return count


def main() -> None:
    from transformers import AutoTokenizer

    from msmodelslim.app.evaluate import load_float_model, perplexity, token_windows
    from msmodelslim.app.tune import TuneRequest, tune
    from msmodelslim.core.dataset import read_texts
    from msmodelslim.core.device import DeviceSpec
    from msmodelslim.core.logging import setup_logging
    from msmodelslim.format.ascendv1.reader import load_ascendv1
    from msmodelslim.model.gguf_import import convert_gguf, find_gguf

    parser = argparse.ArgumentParser()
    parser.add_argument("--work_dir", type=Path, default=Path.home() / ".cache" / "msmodelslim" / "bench" / "tune")
    parser.add_argument("--max_ratio", type=float, default=1.02)
    parser.add_argument("--metric", default="kurtosis", help="analysis_metric ranking the candidates")
    parser.add_argument("--chunks", type=int, default=0,
                        help="calibration-half windows of 512 tokens (0: all); tune holds out the last quarter")
    parser.add_argument("--max_windows", type=int, default=16, help="tune-evaluation windows (held out)")
    parser.add_argument("--timeout", default=None)
    parser.add_argument("--strategy", choices=["binary_fallback", "standing_high"], default="binary_fallback",
                        help="standing_high tries SmoothQuant (alpha 0.8), then iter_smooth, in front of the template")
    args = parser.parse_args()
    setup_logging()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    model_dir = convert_gguf(find_gguf(), Path.home() / ".cache" / "msmodelslim" / "demo" / "SmolLM2-135M-Instruct")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    chunks = calibration_chunks(tokenizer, 512, args.chunks, args.work_dir / "calib_chunks.jsonl")
    template = {"apiversion": "modelslim_v1",
                "metadata": {"config_id": "w8a8-static", "label": {"w_bit": 8, "a_bit": 8}},
                "spec": {"runner": "layer_wise",
                         "process": [{"type": "linear_quant", "qconfig": {"act": STATIC, "weight": W8},
                                      "include": ["*"], "exclude": ["lm_head"]}],
                         "save": [{"type": "ascendv1_saver", "part_file_size": 0}],
                         "dataset": "calib_chunks.jsonl"}}
    if args.strategy == "binary_fallback":
        strategy = {"type": "binary_fallback", "template": template, "rollback_path": "spec.process.0.exclude",
                    "analysis_metric": args.metric}
    else:
        strategy = {"type": "standing_high", "template": template, "analysis_metric": args.metric,
                    "anti_outlier_strategies": [[{"type": "smooth_quant", "alpha": 0.8}], [{"type": "iter_smooth"}]]}
    plan = {"strategy": strategy,
            "evaluation": {"type": "perplexity", "demand": {"max_ratio": args.max_ratio}, "window": 512,
                           "max_windows": args.max_windows}}
    plan_file = args.work_dir / "plan.yaml"
    plan_file.write_text(yaml.safe_dump(plan, sort_keys=False))
    print(f"calibration half: {chunks} windows of 512 tokens; plan {plan_file}", flush=True)
    started = time.perf_counter()
    report = tune(TuneRequest(model_path=model_dir, save_path=args.work_dir / "out", config_path=plan_file,
                              model_type="SmolLM2-135M-Instruct", device=DeviceSpec("cpu"), timeout=args.timeout))
    seconds = time.perf_counter() - started
    print(f"tune: {len(report.iterations)} iterations, {report.evaluated} evaluated, "
          f"{sum(r['cached'] for r in report.iterations)} cached, {seconds:.1f} s, stopped: {report.stopped}")
    for r in report.iterations:
        cost = "cached" if r["cached"] else f"{r['seconds']:.1f} s"
        print(f"  {r['config_id']}: {len(r['fallback'])} in float, {r['detail']}, {cost}")
    if report.chosen is None:
        return
    print(f"chosen {report.chosen['config_id']} (passed {report.chosen['passed']}): float {report.fallback}")
    windows = token_windows(tokenizer, read_texts(CORPORA / "debian-reference.eval.txt"), 512, 40)
    reference = perplexity(load_float_model(model_dir, False), windows, torch.device("cpu"), "float").perplexity
    quantized = perplexity(load_ascendv1(args.work_dir / "out" / "quant_model"), windows, torch.device("cpu"),
                           "chosen").perplexity
    print(f"evaluation half, 40 x 512: float {reference:.4f}, chosen {quantized:.4f} (x{quantized / reference:.4f})")


if __name__ == "__main__":
    main()
