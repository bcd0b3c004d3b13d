"""Which decoder layers make one ascendv1 checkpoint worse than another of the same model and pipeline (run by
hand, not in CI): for each set of layers, checkpoint A with those layers' tensors taken from B, scored on the
evaluation half. A layer's tensors (its weights, scales and folded smoothing) only act together with each other,
so swapping whole layers gives a model that is consistent. Used for issue #26 item 5 (bfloat16 against float32
calibration of the same static pipeline):

    OMP_NUM_THREADS=2 python benchmarks/layer_swap.py --a A_DIR --b B_DIR --sets 'none;all;0-14;15-29;28'
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from smollm2_accuracy import CORPORA  # noqa: E402


def layer_set(text: str, layers: int) -> set[int]:
    """`none`, `all`, or comma-separated indices and ranges (`0-14,28`)."""
    if text in ("none", "all"):
        return set(range(layers)) if text == "all" else set()
    chosen: set[int] = set()
    for part in text.split(","):
        low, _, high = part.partition("-")
        chosen.update(range(int(low), int(high or low) + 1))
    return chosen


def mixed_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], layers: set[int]) -> dict:
    """A's tensors, with every `model.layers.<i>.` tensor of the chosen layers taken from B."""
    if a.keys() != b.keys():
        raise SystemExit("the two checkpoints hold different tensor names: not the same model and pipeline")

    def from_b(name: str) -> bool:
        parts = name.split(".")
        return parts[:2] == ["model", "layers"] and int(parts[2]) in layers

    return {name: (b[name] if from_b(name) else tensor) for name, tensor in a.items()}


def main() -> None:
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoTokenizer

    from msmodelslim.app.evaluate import perplexity, token_windows
    from msmodelslim.core.dataset import read_texts
    from msmodelslim.format.ascendv1.reader import load_ascendv1

    parser = argparse.ArgumentParser()
    parser.add_argument("--a", type=Path, required=True, help="the checkpoint to start from")
    parser.add_argument("--b", type=Path, required=True, help="the checkpoint whose layers are swapped in")
    parser.add_argument("--sets", default="none;all", help="layer sets separated by ';' (see layer_set)")
    parser.add_argument("--windows", type=int, default=40, help="evaluation windows of 512 tokens")
    args = parser.parse_args()
    shards = [sorted(d.glob("*.safetensors")) for d in (args.a, args.b)]
    if any(len(s) != 1 for s in shards) or shards[0][0].name != shards[1][0].name:
        raise SystemExit("each checkpoint must hold one safetensors shard of the same name (part_file_size large)")
    a, b = load_file(shards[0][0]), load_file(shards[1][0])
    layers = AutoConfig.from_pretrained(args.a).num_hidden_layers
    tokenizer = AutoTokenizer.from_pretrained(args.a, local_files_only=True)
    windows = token_windows(tokenizer, read_texts(CORPORA / "debian-reference.eval.txt"), 512, args.windows)
    with tempfile.TemporaryDirectory() as scratch:
        for text in args.sets.split(";"):
            mixed = Path(scratch) / "mixed"
            shutil.copytree(args.a, mixed)
            save_file(mixed_tensors(a, b, layer_set(text, layers)), str(mixed / shards[0][0].name),
                      metadata={"format": "pt"})
            ppl = perplexity(load_ascendv1(mixed), windows, torch.device("cpu"), text).perplexity
            print(f"layers from B: {text}: ppl {ppl:.4f}", flush=True)
            shutil.rmtree(mixed)


if __name__ == "__main__":
    main()
