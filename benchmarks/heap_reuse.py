"""Time and peak RSS of a layer_wise run on SmolLM2-135M-Instruct against MSMODELSLIM_HEAP_REUSE_MIB, with the dry
run's estimate beside each (run by hand, not in CI; nothing else heavy on the machine).

Inside a block, temporaries up to the cap are served from the heap and reused batch after batch (no page faults);
larger ones get mappings of their own. The default cap (1024 MiB) is the fastest, but the heap fragments block
after block and later blocks touch more of it than the first one, which the dry run measures (core/memory.py).
Each (config, cap): the dry run's estimate in a child process, then the real run under /usr/bin/time -v.

    python benchmarks/heap_reuse.py [--caps 1024,32,1] [--configs sq+w8a8_dynamic,quarot_online+w4a4_gptq]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dry_run_estimates import timed  # noqa: E402
from side_by_side import protocol  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
INT4 = {"dtype": "int4", "scope": "per_channel", "symmetric": True, "method": "gptq", "ext": {"act_order": True}}
CONFIGS = {
    "sq+w8a8_dynamic": [
        {"type": "smooth_quant", "alpha": 0.5, "enable_subgraph_type": ["norm-linear", "ov", "up-down"]},
        {"type": "linear_quant", "include": ["*"], "exclude": ["lm_head"], "qconfig": {
            "act": {"dtype": "int8", "scope": "per_token", "symmetric": True, "method": "minmax"},
            "weight": {"dtype": "int8", "scope": "per_channel", "symmetric": True, "method": "minmax"}}}],
    "quarot_online+w4a4_gptq": [
        {"type": "quarot", "online": True, "max_tp_size": 1, "seed": 1, "down_proj_online_layers": list(range(30))},
        {"type": "linear_quant", "include": ["*"], "exclude": ["lm_head"], "qconfig": {
            "act": {"dtype": "int4", "scope": "per_token", "symmetric": True, "method": "minmax"}, "weight": INT4}}],
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--caps", default="1024,32,1", help="MSMODELSLIM_HEAP_REUSE_MIB values")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--work_dir", type=Path, default=None)
    args = parser.parse_args()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="heap-reuse-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir, _, _, _, calib = protocol(work, 1, 64, float_ppl=1.0)  # 64 x 512 tokens of the calibration half
    rows = []
    for name in args.configs.split(","):
        config = work / f"{name}.yaml"
        config.write_text(yaml.safe_dump({"apiversion": "modelslim_v1", "spec": {
            "runner": "layer_wise", "dataset": str(calib), "process": CONFIGS[name],
            "save": [{"type": "ascendv1_saver", "part_file_size": 4}]}}, sort_keys=False))
        for cap in args.caps.split(","):
            env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "PYTHONPATH": str(ROOT),
                   "MSMODELSLIM_HEAP_REUSE_MIB": cap, "MSMODELSLIM_LOG_LEVEL": "warning"}
            out, result = work / f"out-{name}-{cap}", work / f"{name}-{cap}.json"
            timed([sys.executable, str(ROOT / "benchmarks" / "dry_run_estimates.py"), "--child", str(model_dir),
                   str(out), str(config), str(result)], env)
            estimate = json.loads(result.read_text())
            wall, rss, _ = timed([sys.executable, "-m", "msmodelslim", "quant", "--model_path", str(model_dir),
                                  "--save_path", str(out), "--device", "cpu", "--model_type", "Llama-2-7B",
                                  "--config_path", str(config)], env)
            rows.append((name, cap, wall, rss, estimate["peak_rss_bytes"], estimate["seconds"]))
            print(f"{name} cap {cap} MiB: {wall:.1f} s, peak {rss / 2**30:.3f} GiB; estimate "
                  f"{estimate['peak_rss_bytes'] / 2**30:.3f} GiB, {estimate['seconds']:.0f} s", flush=True)
    print("\n| config | MSMODELSLIM_HEAP_REUSE_MIB | wall s | peak RSS GiB | estimate GiB | estimate / peak "
          "| estimated s / wall |")
    print("|---|---|---|---|---|---|---|")
    for name, cap, wall, rss, est_rss, est_s in rows:
        print(f"| {name} | {cap} | {wall:.1f} | {rss / 2**30:.3f} | {est_rss / 2**30:.3f} | {est_rss / rss:.2f} | "
              f"{est_s / wall:.2f} |")


if __name__ == "__main__":
    main()
