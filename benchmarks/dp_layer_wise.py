"""dp_layer_wise with CPU ranks against one process, on SmolLM2-135M-Instruct (run by hand, not in CI).

    python benchmarks/dp_layer_wise.py --ranks 2 --schemes w8a8_static,iter+w8a8_static

Same calibration as the accuracy benchmarks (128 x 512 tokens of the calibration half). Each scheme is quantized
by the real CLI twice, `--device cpu` (layer_wise, one process using every core) and `--device cpu:0,..,N-1`
(N ranks, each with cores/N threads), and we report both wall times, their ratio, the peak RSS of the largest
process, and whether the two checkpoints hold identical tensors (they must, for min/max and smoothing).
On a machine whose cores one process already keeps busy, ranks can only add their start-up cost: the point
of data parallelism is several accelerators, which this benchmark cannot show on a CPU-only machine.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from safetensors.torch import load_file

from side_by_side import protocol
from smollm2_accuracy import SCHEMES, quantize_in_child, write_config


def tensors(out: Path) -> dict:
    found = {}
    for shard in sorted(out.glob("*.safetensors")):
        found.update(load_file(shard))
    return found


def main() -> None:
    import torch

    parser = argparse.ArgumentParser()
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--schemes", default="w8a8_static,iter+w8a8_static", help=f"from: {', '.join(SCHEMES)}")
    parser.add_argument("--work_dir", type=Path, default=Path.home() / ".cache" / "msmodelslim" / "dp_bench")
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    model_dir, _, _, _, calib = protocol(args.work_dir, 1)
    ranks = "cpu:" + ",".join(str(i) for i in range(args.ranks))
    rows = []
    for name in args.schemes.split(","):
        config = args.work_dir / f"{name}.yaml"
        write_config(config, SCHEMES[name], str(calib), "auto")
        single_s, single_rss = quantize_in_child(model_dir, config, args.work_dir / f"{name}-single")
        dp_s, dp_rss = quantize_in_child(model_dir, config, args.work_dir / f"{name}-dp", device=ranks)
        a, b = tensors(args.work_dir / f"{name}-single"), tensors(args.work_dir / f"{name}-dp")
        same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        rows.append((name, single_s, dp_s, single_rss, dp_rss, same))
        print(f"{name}: single {single_s:.1f} s, {ranks} {dp_s:.1f} s, identical: {same}", flush=True)
    print(f"\n{os.cpu_count()} cores; {args.ranks} ranks\n")
    print("| scheme | layer_wise s | dp_layer_wise s | dp / single | peak RSS MiB single | largest rank | identical |")
    print("|---|---|---|---|---|---|---|")
    for name, single_s, dp_s, single_rss, dp_rss, same in rows:
        print(f"| {name} | {single_s:.1f} | {dp_s:.1f} | {dp_s / single_s:.3f} | {single_rss:.0f} | {dp_rss:.0f} | {same} |")


if __name__ == "__main__":
    main()
