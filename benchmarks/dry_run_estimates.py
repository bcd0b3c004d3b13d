"""`quant --dry_run` estimates against the real run (issue #23, item 5; run by hand, under the heavy-run lock).

For each config: a dry run in a child process (the estimates, as JSON), then the real run in a child process under
/usr/bin/time -v (its peak RSS and wall time), then the output's size on disk. Prints estimate, measurement and
their ratio.

    flock /tmp/heavy.lock python benchmarks/dry_run_estimates.py                      # SmolLM2, the demo's copy
    flock /tmp/heavy.lock python benchmarks/dry_run_estimates.py --synthetic 7b   # writes it first if missing (13.8 GB)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = Path.home() / ".cache" / "msmodelslim" / "demo" / "SmolLM2-135M-Instruct"
W8 = {"dtype": "int8", "scope": "per_channel", "symmetric": True, "method": "minmax"}
CONFIGS = {
    "w8a8_dynamic": [{"type": "linear_quant", "include": ["*"], "exclude": ["lm_head"], "qconfig": {
        "act": {"dtype": "int8", "scope": "per_token", "symmetric": True, "method": "minmax"}, "weight": W8}}],
    "w8a8_static": [{"type": "linear_quant", "include": ["*"], "exclude": ["lm_head"], "qconfig": {
        "act": {"dtype": "int8", "scope": "per_tensor", "symmetric": False, "method": "minmax"}, "weight": W8}}],
    "sq+w8a8_dynamic": [{"type": "smooth_quant", "alpha": 0.5, "enable_subgraph_type": ["norm-linear", "ov", "up-down"]},
                        {"type": "linear_quant", "include": ["*"], "exclude": ["lm_head"], "qconfig": {
                            "act": {"dtype": "int8", "scope": "per_token", "symmetric": True, "method": "minmax"},
                            "weight": W8}}],
}


def child_dry_run(model_path: Path, save_path: Path, config: Path, model_type: str, result: Path) -> None:
    """In the child: the dry run through the Python API, its estimate written as JSON."""
    started = time.time()
    from msmodelslim.app.quantize import quantize
    from msmodelslim.app.quantize_request import QuantizeRequest
    from msmodelslim.core.device import DeviceSpec
    from msmodelslim.core.logging import setup_logging

    setup_logging()

    report = quantize(QuantizeRequest(model_path=model_path, save_path=save_path, model_type=model_type,
                                      device=DeviceSpec("cpu"), config_path=config, dry_run=True, estimate=True,
                                      started_at=started))
    print("\n".join(report.estimate.lines()), flush=True)
    result.write_text(json.dumps({**report.estimate.as_dict(), "dry_run_seconds": time.time() - started}))


def timed(argv: list[str], env: dict) -> tuple[float, float, str]:
    """(wall s, peak RSS bytes, stderr) of a child under /usr/bin/time -v."""
    done = subprocess.run(["/usr/bin/time", "-v", *argv], capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)[1]) * 1024
    clock = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", done.stderr)
    wall = int(clock[1] or 0) * 3600 + int(clock[2]) * 60 + float(clock[3])
    return wall, rss, done.stderr


def synthetic_checkpoint(shape: str) -> tuple[Path, str]:
    """benchmarks/synthetic_large.py's checkpoint of `shape` and calibration file (written when missing)."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from synthetic_large import calibration_file, write_checkpoint
    from msmodelslim.model.gguf_import import convert_gguf, find_gguf

    work = Path.home() / ".cache" / "msmodelslim" / "synthetic"
    tokenizer_dir = convert_gguf(find_gguf(), DEMO_MODEL)
    source = work / f"llama-{shape}-bf16"
    if not (source / "SIZES.json").exists():
        shutil.rmtree(source, ignore_errors=True)
        sizes = write_checkpoint(source, shape, tokenizer_dir, torch.bfloat16)
        (source / "SIZES.json").write_text(json.dumps(sizes))
    return source, str(calibration_file(work / "calib.jsonl", tokenizer_dir, 8, 512))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model_path", type=Path, default=DEMO_MODEL)
    parser.add_argument("--model_type", default="Llama-2-7B")
    parser.add_argument("--configs", default="w8a8_dynamic,w8a8_static", help=", ".join(CONFIGS))
    parser.add_argument("--calib", default=None, help="calibration file (default: the shipped mix_calib.jsonl)")
    parser.add_argument("--work_dir", type=Path, default=None)
    parser.add_argument("--synthetic", default=None, help="a shape of benchmarks/synthetic_large.py (e.g. 7b): its "
                        "checkpoint (written first when missing) and its 8 x 512-token calibration file")
    parser.add_argument("--child", nargs=4, metavar=("MODEL", "SAVE", "CONFIG", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model, save, config, result = map(Path, args.child)
        child_dry_run(model, save, config, args.model_type, result)
        return
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="dry-run-estimates-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.synthetic:
        args.model_path, args.calib = synthetic_checkpoint(args.synthetic)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "PYTHONPATH": str(ROOT)}
    rows = []
    for name in args.configs.split(","):
        spec = {"runner": "layer_wise", "process": CONFIGS[name], "save": [{"type": "ascendv1_saver", "part_file_size": 4}]}
        if args.calib:
            spec["dataset"] = args.calib
        config = work / f"{name}.yaml"
        config.write_text(yaml.safe_dump({"apiversion": "modelslim_v1", "spec": spec}, sort_keys=False))
        out, result = work / f"out-{name}", work / f"{name}.estimate.json"
        shutil.rmtree(out, ignore_errors=True)
        dry_wall, _, _ = timed([sys.executable, __file__, "--model_type", args.model_type, "--child",
                                str(args.model_path), str(out), str(config), str(result)], env)
        estimate = json.loads(result.read_text())
        wall, rss, _ = timed([sys.executable, "-m", "msmodelslim", "quant", "--model_path", str(args.model_path),
                              "--save_path", str(out), "--device", "cpu", "--model_type", args.model_type,
                              "--config_path", str(config)], env)
        disk = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        shutil.rmtree(out)
        rows.append((name, estimate, dry_wall, wall, rss, disk))
        print(f"{name}: dry run {dry_wall:.1f} s; estimate RSS {estimate['peak_rss_bytes'] / 2**30:.3f} GiB, "
              f"{estimate['seconds']:.1f} s, {sum(estimate['output_bytes'].values()) / 2**20:.1f} MiB; measured RSS "
              f"{rss / 2**30:.3f} GiB, {wall:.1f} s, {disk / 2**20:.1f} MiB; phases {estimate['seconds_by_phase']}",
              flush=True)
    print(f"\n{args.model_path.name}, OMP_NUM_THREADS={env['OMP_NUM_THREADS']}")
    print("| config | dry run s | peak RSS est / measured GiB | ratio | wall est / measured s | ratio "
          "| disk est / measured MiB | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for name, estimate, dry_wall, wall, rss, disk in rows:
        est_disk = sum(estimate["output_bytes"].values())
        print(f"| {name} | {dry_wall:.1f} | {estimate['peak_rss_bytes'] / 2**30:.3f} / {rss / 2**30:.3f} | "
              f"{estimate['peak_rss_bytes'] / rss:.2f} | {estimate['seconds']:.1f} / {wall:.1f} | "
              f"{estimate['seconds'] / wall:.2f} | {est_disk / 2**20:.1f} / {disk / 2**20:.1f} | {est_disk / disk:.2f} |")


if __name__ == "__main__":
    main()
