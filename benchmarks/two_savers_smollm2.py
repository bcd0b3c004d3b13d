"""Both formats from one calibration against each format alone (issue #23 item 6; run by hand, not in CI).

One `quant` run with `spec.save: [ascendv1_saver, compressed_tensors]`, then one run per saver alone, all with
the same calibrated pipeline on SmolLM2-135M-Instruct (the demo's copy). Each run is a child process under
/usr/bin/time -v. Every file of each subfolder is compared by SHA-256 with the single-format run's file of the
same name; `*_best_practice.yaml` is compared too (each folder's names only its own saver). The completion
marker is left out: there is one per save_path.

    OMP_NUM_THREADS=2 python benchmarks/two_savers_smollm2.py
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dry_run_estimates import DEMO_MODEL, ROOT, timed  # noqa: E402

SAVERS = {"ascendv1": {"type": "ascendv1_saver", "part_file_size": 0.1},
          "compressed_tensors": {"type": "compressed_tensors", "part_file_size": 0.1}}
PROCESS = [
    {"type": "smooth_quant", "alpha": 0.5, "enable_subgraph_type": ["norm-linear", "ov", "up-down"]},
    {"type": "linear_quant", "include": ["*"], "exclude": ["lm_head"], "qconfig": {
        "act": {"dtype": "int8", "scope": "per_token", "symmetric": True, "method": "minmax"},
        "weight": {"dtype": "int8", "scope": "per_channel", "symmetric": True, "method": "minmax"}}},
]


MARKER = ".msmodelslim.json"  # the completion marker: one per save_path, for the whole output, so not compared


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MARKER}


def run(work: Path, name: str, savers: list[dict], env: dict) -> tuple[Path, float, float]:
    config = work / f"{name}.yaml"
    spec = {"runner": "layer_wise", "process": PROCESS, "save": savers}
    config.write_text(yaml.safe_dump({"apiversion": "modelslim_v1", "spec": spec}, sort_keys=False))
    out = work / f"out-{name}"
    shutil.rmtree(out, ignore_errors=True)
    wall, rss, _ = timed([sys.executable, "-m", "msmodelslim", "quant", "--model_path", str(DEMO_MODEL),
                          "--save_path", str(out), "--device", "cpu", "--model_type", "Llama-2-7B",
                          "--config_path", str(config)], env)
    return out, wall, rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work_dir", type=Path, default=None)
    args = parser.parse_args()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="two-savers-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "PYTHONPATH": str(ROOT)}
    both, wall, rss = run(work, "both", list(SAVERS.values()), env)
    print("| run | wall s | peak RSS GiB | files | identical to the run with both |")
    print("|---|---|---|---|---|")
    print(f"| both savers | {wall:.1f} | {rss / 2**30:.3f} | {len(digests(both))} | |")
    for folder, saver in SAVERS.items():
        alone, wall, rss = run(work, folder, [saver], env)
        mine, theirs = digests(alone), digests(both / folder)
        same = [n for n in mine if theirs.get(n) == mine[n]]
        differ = sorted(set(mine) ^ set(theirs) | {n for n in mine if n in theirs and theirs[n] != mine[n]})
        print(f"| {saver['type']} alone | {wall:.1f} | {rss / 2**30:.3f} | {len(mine)} | "
              f"{len(same)} of {len(mine)}{'' if not differ else ' (differ: ' + ', '.join(differ) + ')'} |")


if __name__ == "__main__":
    main()
