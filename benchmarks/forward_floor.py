"""The floor under a one-forward-per-block calibration (issue #26): the time of one SmolLM2-135M decoder layer
(hidden 576, MLP 1536, 9 heads / 3 KV heads of 64, causal SDPA) over the calibration set's tokens, float32 and
bfloat16, with nothing else in the process (no hooks, no loading, no writing). Run by hand, not in CI:

    OMP_NUM_THREADS=2 python benchmarks/forward_floor.py --tokens 65536 --rows 16,4

Times 30 x that layer time is what any tool pays to push 128 x 512 tokens through SmolLM2's 30 layers once.
Also prints whether this CPU multiplies bfloat16 in hardware (msmodelslim.core.device.cpu_has_native_bfloat16).
"""
from __future__ import annotations

import argparse
import resource
import time

import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from msmodelslim.core.device import cpu_has_native_bfloat16

SEQUENCE = 512


def layer_seconds(rows: int, tokens: int, dtype: torch.dtype) -> tuple[float, int]:
    """Wall seconds for `tokens` tokens through one layer in batches of `rows` x 512, and minor page faults."""
    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                         head_dim=64, attn_implementation="sdpa")
    layer = LlamaDecoderLayer(config, 0).eval().to(dtype)
    x = torch.randn(rows, SEQUENCE, 576, dtype=dtype)
    positions = torch.arange(SEQUENCE)[None].expand(rows, -1)
    embeddings = tuple(e.to(dtype) for e in LlamaRotaryEmbedding(config)(x, positions))
    batches = max(1, tokens // (rows * SEQUENCE))
    with torch.no_grad():
        layer(x, position_embeddings=embeddings, attention_mask=None, position_ids=positions)  # warm-up
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        started = time.perf_counter()
        for _ in range(batches):
            layer(x, position_embeddings=embeddings, attention_mask=None, position_ids=positions)
        seconds = time.perf_counter() - started
    return seconds, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--rows", default="16,4", help="samples of 512 tokens per forward, comma-separated")
    parser.add_argument("--layers", type=int, default=30)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU bfloat16 units: "
          f"{cpu_has_native_bfloat16()}")
    print("| dtype | rows x 512 | one layer s | x layers s | minor page faults |")
    print("|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        for rows in (int(r) for r in args.rows.split(",")):
            seconds, faults = layer_seconds(rows, args.tokens, dtype)
            print(f"| {str(dtype).removeprefix('torch.')} | {rows} | {seconds:.2f} | {seconds * args.layers:.1f} | "
                  f"{faults} |", flush=True)


if __name__ == "__main__":
    main()
