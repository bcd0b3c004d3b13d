"""Does `analyze layer` rank the blocks that matter? (issue #23 acceptance; run by hand, not in CI)

On the real SmolLM2-135M-Instruct, on the CPU:
1. `analyze layer --config_path <static W8A8>` ranks the 30 decoder blocks by the error static W8A8 adds
   (mse_layer_wise, layer_wise: one block in memory at a time).
2. Quantize ONLY the top-3 ranked blocks to static W8A8 (include: their `model.layers.N.*`), then ONLY the
   bottom-3, through the real CLI in a child process; perplexity of each against float. The ranking is useful
   if the top-3 hurt more than the bottom-3.
3. With --exclude_runs: the whole model in static W8A8 except the top-3 (the analysis's exclude.yaml pasted into
   the config), and except the bottom-3, the way a user applies the result.

Calibration (analysis and quantization alike): windows of the corpus's calibration half; perplexity: 40 windows
x 512 tokens of the evaluation half, as benchmarks/smollm2_accuracy.py.

    python benchmarks/analyze_smollm2.py [--calib_samples 128] [--windows 40] [--exclude_runs]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smollm2_accuracy import (CORPORA, STATIC, WEIGHT_INT8, calibration_windows, linear,  # noqa: E402
                              quantize_in_child, write_config)

MODEL_TYPE = "SmolLM2-135M-Instruct"
W8A8_STATIC = {"act": STATIC, "weight": WEIGHT_INT8}


def block_patterns(blocks: list[str]) -> list[str]:
    return [f"{b}.*" for b in blocks]


def main() -> None:
    from transformers import AutoTokenizer

    from msmodelslim.app.analyze import AnalyzeRequest, analyze
    from msmodelslim.app.evaluate import load_float_model, perplexity, token_windows
    from msmodelslim.core.dataset import read_texts
    from msmodelslim.format.ascendv1.reader import load_ascendv1
    from msmodelslim.model.gguf_import import convert_gguf, find_gguf

    parser = argparse.ArgumentParser()
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--calib_samples", type=int, default=128)
    parser.add_argument("--k", type=int, default=3, help="blocks quantized (or kept float) at each end of the ranking")
    parser.add_argument("--exclude_runs", action="store_true",
                        help="also quantize everything except the top-k / except the bottom-k")
    parser.add_argument("--work_dir", type=Path, default=Path.home() / ".cache" / "msmodelslim" / "bench-analyze")
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)

    model_dir = convert_gguf(find_gguf(), Path.home() / ".cache" / "msmodelslim" / "demo" / MODEL_TYPE)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    calib = calibration_windows(tokenizer, args.calib_samples, 512, args.work_dir / "calib_windows.jsonl")
    scheme = args.work_dir / "w8a8_static.yaml"
    write_config(scheme, [linear(W8A8_STATIC)], str(calib), "layer_wise")

    started = time.perf_counter()
    result = analyze(AnalyzeRequest("layer", MODEL_TYPE, model_dir, calib_dataset=str(calib), topk=args.k,
                                    config_path=scheme, output=args.work_dir / "analysis"))
    analysis_seconds = time.perf_counter() - started
    ranked = [name for name, _ in result.scores]
    top, bottom = ranked[: args.k], ranked[-args.k :]
    print(f"analyze layer (static W8A8, mse_layer_wise): {analysis_seconds:.1f} s; ranking, most sensitive first:")
    for name, score in result.scores:
        print(f"  {name:18s} {score:.4e}")

    windows = token_windows(tokenizer, read_texts(CORPORA / "debian-reference.eval.txt"), 512, args.windows)
    float_ppl = perplexity(load_float_model(model_dir, False), windows, torch.device("cpu"), "float").perplexity
    print(f"float: ppl {float_ppl:.4f} on {len(windows)} x 512 tokens of the eval half", flush=True)

    runs = {f"only top-{args.k} quantized": dict(include=block_patterns(top)),
            f"only bottom-{args.k} quantized": dict(include=block_patterns(bottom))}
    if args.exclude_runs:
        runs[f"all but top-{args.k} (exclude.yaml)"] = dict(exclude=["lm_head"] + result.exclude)
        runs[f"all but bottom-{args.k}"] = dict(exclude=["lm_head"] + block_patterns(bottom))
    rows = []
    for i, (label, rule) in enumerate(runs.items()):
        config = args.work_dir / f"run{i}.yaml"
        write_config(config, [linear(W8A8_STATIC, **rule)], str(calib), "layer_wise")
        out = args.work_dir / f"run{i}"
        seconds, _ = quantize_in_child(model_dir, config, out, MODEL_TYPE)
        ppl = perplexity(load_ascendv1(out), windows, torch.device("cpu"), label).perplexity
        rows.append((label, rule, ppl, seconds))
        print(f"{label}: ppl {ppl:.4f} (x{ppl / float_ppl:.4f} of float), quantize {seconds:.1f} s; "
              f"{yaml.safe_dump(rule, default_flow_style=True).strip()}", flush=True)

    print("\n| run (static W8A8, layer_wise) | blocks | perplexity | vs float |")
    print("|---|---|---|---|")
    print(f"| float | - | {float_ppl:.4f} | 1.0000 |")
    for label, rule, ppl, _ in rows:
        blocks = ", ".join(p.split(".")[2] for p in rule.get("include", rule.get("exclude", [])[1:]))
        print(f"| {label} | {blocks} | {ppl:.4f} | {ppl / float_ppl:.4f} |")


if __name__ == "__main__":
    main()
