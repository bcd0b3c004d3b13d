"""Time each weight method on one 512x512 layer with 4096 calibration rows (by hand; CI asserts no speed).

    python benchmarks/method_time.py [--repeat 3]

This replaces a bounded-time test that failed CI once under load (ssz: 16.1 s against 15 s): how fast a method
is belongs here, measured, not asserted on a shared machine. Prints the minimum and median over the repeats and
the ratio to round-to-nearest (minmax) on the same layer, after one warm-up call each.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from msmodelslim.processor.flex_awq_ssz.search import awq_scales, weight_mean
from msmodelslim.quantizer.autoround import AutoRoundSettings, autoround_quantize
from msmodelslim.quantizer.error import scaled_output_error
from msmodelslim.quantizer.gptq import accumulate_hessian, gptq_quantize
from msmodelslim.quantizer.observer import HistogramObserver
from msmodelslim.quantizer.primitives import quantize_weight_minmax
from msmodelslim.quantizer.scheme import QConfig
from msmodelslim.quantizer.ssz import ssz_quantize


def layer() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(9)
    x = torch.randn(4096, 32, generator=g) @ torch.randn(32, 512, generator=g)
    return x, torch.randn(512, 512, generator=g) * 0.05


def run_gptq(x, w):
    hessian, _ = accumulate_hessian(None, 0, x)
    return gptq_quantize(w, hessian, 4, True, 64, act_order=True)


def run_awq_grid(x, w):
    spec = QConfig(dtype="int4", scope="per_group", method="minmax", ext={"group_size": 64})
    act = QConfig(dtype="float", scope="per_tensor", method="none")
    rows, ref = x[:512], x[:512] @ w.T
    return [scaled_output_error(rows, w, awq_scales(rows.abs().mean(0), weight_mean([w], 64), a / 20, 0), spec, act,
                                ref) for a in range(20)]


def run_histogram(x, w):
    observer = HistogramObserver(False)
    for part in x.split(512):
        observer.update(part)
    return observer.qparams(8, False)


METHODS = {
    "minmax": lambda x, w: quantize_weight_minmax(w, 4, True, 64),
    "gptq": run_gptq,
    "ssz": lambda x, w: ssz_quantize(w, 4, True, 64),
    "autoround(10 iters)": lambda x, w: autoround_quantize(w, x[:1024], x[:1024], 4, True, 64,
                                                           AutoRoundSettings(iters=10)),
    "awq grid(20)": run_awq_grid,
    "histogram": run_histogram,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    x, w = layer()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; 512x512 layer, 4096 rows")
    base = None
    for name, method in METHODS.items():
        method(x, w)  # warm-up: first calls pay for allocation and kernel selection
        times = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            method(x, w)
            times.append(time.perf_counter() - started)
        base = base or min(times)
        print(f"{name:22s} min {min(times):7.3f} s  median {statistics.median(times):7.3f} s  "
              f"x{min(times) / base:7.1f} minmax")


if __name__ == "__main__":
    main()
