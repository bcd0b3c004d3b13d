"""What calibration costs on SmolLM2 (issue #26): the same schemes run by two copies of msmodelslim in one
process tree, one after the other under the same load: `--before` (a checkout of the code before the change,
e.g. `git archive <commit> msmodelslim | tar -x -C /tmp/before`) and the working tree, each with the
`spec.calibration` section of its variant. Float32 SmolLM2-135M-Instruct and the windows of
benchmarks/side_by_side.py (128 x 512-token calibration windows, 40 x 512-token evaluation windows; fewer with
--calib_windows / --windows). Run by hand, not in CI:

    python benchmarks/calibration_cost.py --before /tmp/before \
        --schemes sq0.8+w8a8_static_down_dynamic,sq0.5+w8a8_dynamic --variants before,after_default
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from smollm2_accuracy import CORPORA, SCHEMES, calibration_windows  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# label: spec.calibration (None: leave it out, as the code before the change requires)
VARIANTS = {
    "before": None,
    "before_bf16": {"precision": "bfloat16"},  # the code under --before, range-only forwards in bfloat16
    "after_no_early_stop": {"early_stop": False},
    "after_default": {},
    # bfloat16 range-only forwards where the CPU has bfloat16 units, else float32 (spec.calibration.precision auto)
    "after_auto": {"precision": "auto"},
    # range-only calibration forwards (smoothing, static min/max) under bfloat16 autocast (spec.calibration.precision)
    "after_bf16": {"precision": "bfloat16"},
    # forced, not converged: every block stops after its first 3 batches whatever the ranges do (rtol 2 always
    # passes); batches are ordered by length: the 3 windows of 511 tokens, then batches of 16 x 512
    "after_forced_3_batches": {"early_stop": True, "rtol": 2.0, "window_tokens": 1,
                               "min_tokens": 3 * 511 + 2 * 16 * 512},
}


def write_config(path: Path, process: list, dataset: str, calibration) -> None:
    import yaml

    spec = {"runner": "layer_wise", "process": process, "save": [{"type": "ascendv1_saver", "part_file_size": 4}],
            "dataset": dataset}
    if calibration is not None:
        spec["calibration"] = calibration
    path.write_text(yaml.safe_dump({"apiversion": "modelslim_v1", "spec": spec}))


def quantize(code_root: Path, model_dir: Path, config: Path, out: Path) -> tuple[float, float, str]:
    """The CLI of the msmodelslim under `code_root` in a child process: wall s, peak RSS MiB, its log."""
    code = ("import resource, sys; from msmodelslim.cli.__main__ import main; rc = main(sys.argv[1:]); "
            "print('PEAK_RSS_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
    args = [sys.executable, "-c", code, "quant", "--model_path", str(model_dir), "--save_path", str(out),
            "--device", "cpu", "--model_type", "SmolLM2-135M-Instruct", "--config_path", str(config), "--overwrite"]
    env = {**os.environ, "MSMODELSLIM_LOG_LEVEL": "info", "PYTHONPATH": str(code_root)}
    started = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=code_root)  # cwd first on sys.path
    seconds = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(f"quantization failed:\n{proc.stderr[-3000:]}")
    rss = int(re.search(r"PEAK_RSS_KIB (\d+)", proc.stdout).group(1)) / 1024
    return seconds, rss, proc.stderr


def protocol(work_dir: Path, windows: int, calib_windows: int):
    """side_by_side.py's inputs, with a chosen number of calibration windows: (float checkpoint, evaluation
    windows, float perplexity on them, calibration file)."""
    from transformers import AutoTokenizer

    from msmodelslim.app.evaluate import load_float_model, perplexity, token_windows
    from msmodelslim.core.dataset import read_texts
    from msmodelslim.model.gguf_import import convert_gguf, find_gguf

    model_dir = convert_gguf(find_gguf(), Path.home() / ".cache" / "msmodelslim" / "demo" / "SmolLM2-135M-Instruct")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    eval_windows = token_windows(tokenizer, read_texts(CORPORA / "debian-reference.eval.txt"), 512, windows)
    float_ppl = perplexity(load_float_model(model_dir, False), eval_windows, torch.device("cpu"), "float").perplexity
    calib = calibration_windows(tokenizer, calib_windows, 512, work_dir / f"calib_windows_{calib_windows}.jsonl")
    print(f"float ppl {float_ppl:.4f} on {len(eval_windows)} windows", flush=True)
    return model_dir, eval_windows, float_ppl, calib


def main() -> None:
    from msmodelslim.app.evaluate import perplexity
    from msmodelslim.format.ascendv1.reader import load_ascendv1

    parser = argparse.ArgumentParser()
    parser.add_argument("--before", type=Path, help="a checkout of msmodelslim before the change (variants 'before*')")
    parser.add_argument("--schemes", default="sq0.8+w8a8_static_down_dynamic,sq0.5+w8a8_dynamic")
    parser.add_argument("--variants", default="before,after_default", help=", ".join(VARIANTS))
    parser.add_argument("--work_dir", type=Path, default=Path.home() / ".cache" / "msmodelslim" / "calibration_cost")
    parser.add_argument("--windows", type=int, default=40, help="evaluation windows of 512 tokens")
    parser.add_argument("--calib_windows", type=int, default=128, help="calibration windows of 512 tokens")
    args = parser.parse_args()
    if any(v.startswith("before") for v in args.variants.split(",")) and args.before is None:
        parser.error("the variants 'before*' need --before (a checkout of the code before the change)")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    model_dir, windows, float_ppl, calib = protocol(args.work_dir, args.windows, args.calib_windows)

    rows = []
    for scheme in args.schemes.split(","):
        for variant in args.variants.split(","):
            root = args.before if variant.startswith("before") else REPO
            config = args.work_dir / f"{scheme}.{variant}.yaml"
            write_config(config, SCHEMES[scheme], str(calib), VARIANTS[variant])
            out = args.work_dir / f"smollm2-{scheme}-{variant}"
            seconds, rss, log = quantize(root, model_dir, config, out)
            ppl = perplexity(load_ascendv1(out), windows, torch.device("cpu"), variant).perplexity
            stopped = [line.split(" - ")[-1] for line in log.splitlines() if "calibration stopped early" in line]
            print(f"{scheme} {variant}: ppl {ppl:.4f} (x{ppl / float_ppl:.4f}), {seconds:.1f} s, {rss:.0f} MiB "
                  f"{stopped[0] if stopped else ''}", flush=True)
            rows.append((scheme, variant, ppl, seconds, rss, stopped[0] if stopped else "all batches"))

    print(f"\nfloat ppl {float_ppl:.4f}\n")
    print("| scheme | code | ppl (vs float) | quantize wall s | peak RSS MiB | calibration |")
    print("|---|---|---|---|---|---|")
    for scheme, variant, ppl, seconds, rss, note in rows:
        print(f"| {scheme} | {variant} | {ppl:.4f} (x{ppl / float_ppl:.4f}) | {seconds:.1f} | {rss:.0f} | {note} |")


if __name__ == "__main__":
    main()
