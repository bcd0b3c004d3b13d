"""How long `load_block` takes per block of a checkpoint as it sits in the page cache now (issue #23's dry-run
estimate times one block's load and scales it to every block). Run by hand, not in CI:

    python benchmarks/block_load_probe.py --model_path /work/synth/llama-7b-bf16 --blocks 0,1,15,31 [--repeat 2]

Loads each listed block as a layer_wise run of a data-free scheme does (bf16 kept as stored), then releases it,
and prints the seconds per load; `--repeat` loads the list again, which shows what pages already mapped once
cost. The model type only picks the adapter (a Llama-shaped checkpoint: Llama-2-7B).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_path", type=Path, required=True)
    parser.add_argument("--model_type", default="Llama-2-7B")
    parser.add_argument("--blocks", default="0,1,15,31", help="comma-separated block indices")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()

    from msmodelslim.model.registry import create_adapter

    cpu = torch.device("cpu")
    adapter = create_adapter(args.model_type, str(args.model_path), False)
    model = adapter.init_model(cpu, load_layers=False)
    model = adapter.load_weights(model, cpu, load_layers=False, defer_output_head=True)
    names = adapter.block_names(model)
    for round_index in range(args.repeat):
        for index in (int(i) for i in args.blocks.split(",")):
            began = time.perf_counter()
            adapter.load_block(model, names[index], cpu, as_stored=True)
            seconds = time.perf_counter() - began
            adapter.release_block(model, names[index])
            print(f"round {round_index + 1}, block {index}: {seconds:.3f} s", flush=True)


if __name__ == "__main__":
    main()
