"""Every measurement of issue #26 ("speed and the first hour") from one command, run by hand (not in CI).

    python benchmarks/first_hour.py --peer_python /tmp/lcvenv/bin/python [--steps demo,eval,calibration,...]
        [--calibration_precision float32|bfloat16|auto]

Steps, in order (each one is an existing script or CLI call, run in a child process; its own table is printed
as it finishes, and this script ends with the wall time of every step):
- `demo`: `msmodelslim demo` twice, the first with the float reference removed (computed), the second cached;
- `eval`: `msmodelslim eval` of the demo's W8A8 checkpoint: float and read-back evaluation times;
- `calibration`: benchmarks/calibration_cost.py, sq0.5 + W8A8 dynamic and sq0.8 + static W8A8 (down_proj
  dynamic): the defaults (early stopping on, float32), no early stopping, and the range-only forwards in
  bfloat16 and in `auto` (bfloat16 where the CPU has bfloat16 units; `spec.calibration.precision`);
- `peers`: benchmarks/side_by_side.py, the same two schemes against llm-compressor's SmoothQuant + GPTQ in one
  run (time, perplexity and peak RSS of both tools; the static peer took 7 to 74 minutes on the CPUs tried);
  ours calibrates in `--calibration_precision` (float32, the practices' default; bfloat16; auto);
- `large13b`: benchmarks/synthetic_large.py on the 13B shape (peak RSS);
- `cold7b`: benchmarks/synthetic_large.py on the 7B shape from a dropped page cache (MB/s of checkpoint; needs
  root to drop the cache).
Needs ~30 GB free disk for the synthetic checkpoints (deleted afterwards).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEMO = Path.home() / ".cache" / "msmodelslim" / "demo"
CORPORA = HERE.parent.parent / "shared" / "corpora"


def commands(peer_python: str, precision: str) -> dict[str, list[list[str]]]:
    cli = [sys.executable, "-m", "msmodelslim"]
    py = [sys.executable]
    return {
        "demo": [["rm", "-f", str(DEMO / "float_reference.json")], cli + ["demo"], cli + ["demo"]],
        "eval": [cli + ["eval", "--model_path", str(DEMO / "SmolLM2-135M-Instruct"),
                        "--quant_path", str(DEMO / "SmolLM2-135M-Instruct-w8a8"),
                        "--dataset", str(CORPORA / "debian-reference.eval.txt")]],
        "calibration": [py + [str(HERE / "calibration_cost.py"),
                              "--schemes", "sq0.5+w8a8_dynamic,sq0.8+w8a8_static_down_dynamic",
                              "--variants", "after_default,after_no_early_stop,after_bf16,after_auto"]],
        "peers": [py + [str(HERE / "side_by_side.py"), "--peer_python", peer_python, "--pairs", "dynamic,static_split",
                        "--calibration_precision", precision]],
        "large13b": [py + [str(HERE / "synthetic_large.py"), "--shape", "13b", "--schemes", "w8a8_dynamic",
                           "--keep_checkpoint", "no"]],
        "cold7b": [py + [str(HERE / "synthetic_large.py"), "--shape", "7b", "--schemes", "w8a8_dynamic",
                         "--cold_cache", "yes", "--keep_checkpoint", "no"]],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peer_python", default="/tmp/lcvenv/bin/python", help="python of llm-compressor's venv")
    parser.add_argument("--steps", default="demo,eval,calibration,peers,large13b,cold7b")
    parser.add_argument("--calibration_precision", choices=("float32", "bfloat16", "auto"), default="float32",
                        help="our calibration forwards in the peers step (spec.calibration.precision)")
    args = parser.parse_args()
    table = commands(args.peer_python, args.calibration_precision)
    unknown = [s for s in args.steps.split(",") if s not in table]
    if unknown:
        parser.error(f"unknown steps {unknown}; choose from {', '.join(table)}")
    times = []
    for step in args.steps.split(","):
        print(f"\n===== {step} =====", flush=True)
        started = time.perf_counter()
        for command in table[step]:
            print("$", " ".join(command), flush=True)
            if subprocess.run(command).returncode:
                print(f"step {step} failed: {' '.join(command)}", flush=True)
                return 1
        times.append((step, time.perf_counter() - started))
    print("\n| step | wall s |\n|---|---|")
    for step, seconds in times:
        print(f"| {step} | {seconds:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
