"""Quantize a synthetic Llama-shaped checkpoint larger than you would like to hold in memory (run by hand).

    python benchmarks/synthetic_large.py --shape 7b --schemes w8a8_dynamic,w8a8_static --work_dir /data/synth
    python benchmarks/synthetic_large.py --shape 13b --schemes w8a8_dynamic --keep_checkpoint no

The checkpoint has random weights (normal, std 0.02) with a few outlier input channels planted in every norm,
is written one decoder layer per shard (so writing it needs one layer of memory), and uses the demo model's
tokenizer (its vocabulary sets the embedding size). Each scheme is quantized layer-wise by the real CLI in a
child process; we report wall time, the child's peak RSS, GB/s of checkpoint processed, and peak RSS divided by
the largest decoder layer's size in the checkpoint's dtype.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from smollm2_accuracy import CORPORA, SCHEMES, quantize_in_child, write_config  # noqa: E402

SHAPES = {  # layers, hidden, intermediate, heads, kv heads
    "tiny": (4, 512, 1376, 8, 8),
    "1.5b": (28, 1536, 8960, 12, 2),
    "7b": (32, 4096, 11008, 32, 32),
    "13b": (40, 5120, 13824, 40, 40),
}


def layer_tensors(hidden: int, intermediate: int, heads: int, kv_heads: int, generator: torch.Generator,
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:
    head_dim = hidden // heads

    def linear(out_features: int, in_features: int) -> torch.Tensor:
        return (torch.randn(out_features, in_features, generator=generator) * 0.02).to(dtype)

    def norm() -> torch.Tensor:
        weight = torch.ones(hidden)
        weight[torch.randint(0, hidden, (4,), generator=generator)] = 20.0  # outlier channels
        return weight.to(dtype)

    return {
        "input_layernorm.weight": norm(),
        "self_attn.q_proj.weight": linear(heads * head_dim, hidden),
        "self_attn.k_proj.weight": linear(kv_heads * head_dim, hidden),
        "self_attn.v_proj.weight": linear(kv_heads * head_dim, hidden),
        "self_attn.o_proj.weight": linear(hidden, heads * head_dim),
        "post_attention_layernorm.weight": norm(),
        "mlp.gate_proj.weight": linear(intermediate, hidden),
        "mlp.up_proj.weight": linear(intermediate, hidden),
        "mlp.down_proj.weight": linear(hidden, intermediate),
    }


def write_checkpoint(out: Path, shape: str, tokenizer_dir: Path, dtype: torch.dtype) -> tuple[int, int]:
    """(total bytes of tensors, bytes of the largest decoder layer). One safetensors shard per layer."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    layers, hidden, intermediate, heads, kv_heads = SHAPES[shape]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=4096, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config.dtype = str(dtype).removeprefix("torch.")
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    generator = torch.Generator().manual_seed(0)
    index, total, largest = {}, 0, 0
    shards = layers + 1

    def save(tensors: dict[str, torch.Tensor], number: int) -> int:
        name = f"model-{number:05d}-of-{shards:05d}.safetensors"
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        index.update({k: name for k in tensors})
        return sum(t.numel() * t.element_size() for t in tensors.values())

    outside = {"model.embed_tokens.weight": (torch.randn(len(tokenizer), hidden, generator=generator) * 0.02).to(dtype),
               "lm_head.weight": (torch.randn(len(tokenizer), hidden, generator=generator) * 0.02).to(dtype),
               "model.norm.weight": torch.ones(hidden, dtype=dtype)}
    total += save(outside, 1)
    for i in range(layers):
        tensors = {f"model.layers.{i}.{k}": v for k, v in
                   layer_tensors(hidden, intermediate, heads, kv_heads, generator, dtype).items()}
        size = save(tensors, i + 2)
        total, largest = total + size, max(largest, size)
        print(f"\rwrote layer {i + 1}/{layers}", end="", flush=True)
    print()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": index}, indent=1))
    return total, largest


def calibration_file(path: Path, tokenizer_dir: Path, samples: int, length: int) -> Path:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    ids = tokenizer(CORPORA.joinpath("debian-reference.calib.txt").read_text(), return_tensors="pt")["input_ids"][0]
    starts = torch.linspace(0, len(ids) - length, samples).long().tolist()
    path.write_text("".join(json.dumps({"text": tokenizer.decode(ids[s:s + length])}) + "\n" for s in starts))
    return path


def drop_page_cache() -> None:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError as exc:
        sys.exit(f"--cold_cache yes: cannot drop the page cache ({exc}); run as root or use --cold_cache no")


def main() -> None:
    from msmodelslim.model.gguf_import import convert_gguf, find_gguf

    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=list(SHAPES), default="7b")
    parser.add_argument("--schemes", default="w8a8_dynamic", help=f"comma-separated, from: {', '.join(SCHEMES)}")
    parser.add_argument("--calib_samples", type=int, default=8)
    parser.add_argument("--work_dir", type=Path, default=Path.home() / ".cache" / "msmodelslim" / "synthetic")
    parser.add_argument("--keep_checkpoint", choices=["yes", "no"], default="yes")
    parser.add_argument("--cold_cache", choices=["yes", "no"], default="no",
                        help="drop the page cache before each scheme (needs root), so the checkpoint is read from disk")
    args = parser.parse_args()
    tokenizer_dir = convert_gguf(find_gguf(), Path.home() / ".cache" / "msmodelslim" / "demo" / "SmolLM2-135M-Instruct")
    source = args.work_dir / f"llama-{args.shape}-bf16"
    marker = source / "SIZES.json"
    if marker.exists():
        total, largest = json.loads(marker.read_text())
    else:
        shutil.rmtree(source, ignore_errors=True)
        total, largest = write_checkpoint(source, args.shape, tokenizer_dir, torch.bfloat16)
        marker.write_text(json.dumps([total, largest]))
    print(f"checkpoint {source}: {total / 1e9:.2f} GB, largest layer {largest / 1e9:.3f} GB", flush=True)
    calib = calibration_file(args.work_dir / "calib.jsonl", tokenizer_dir, args.calib_samples, 512)

    rows = []
    for name in args.schemes.split(","):
        config = args.work_dir / f"{name}.yaml"
        write_config(config, SCHEMES[name], str(calib), "layer_wise")
        out = args.work_dir / f"out-{args.shape}-{name}"
        if args.cold_cache == "yes":
            drop_page_cache()
        seconds, rss = quantize_in_child(source, config, out, model_type="Llama-2-7B")
        out_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        shutil.rmtree(out)
        rows.append((name, seconds, rss, out_bytes))
        print(f"{name}: {seconds:.1f} s, peak RSS {rss / 1024:.2f} GiB, {total / seconds / 1e6:.0f} MB/s, "
              f"RSS / largest layer {rss * 2**20 / largest:.1f}", flush=True)
    if args.keep_checkpoint == "no":
        shutil.rmtree(source)

    layers, hidden, intermediate, heads, kv_heads = SHAPES[args.shape]
    cache = "page cache dropped before each scheme" if args.cold_cache == "yes" else "page cache as it was"
    print(f"\n{cache}; {args.shape}-shaped ({layers} layers, hidden {hidden}, intermediate {intermediate}), "
          f"{total / 1e9:.2f} GB bf16, largest layer {largest / 1e6:.0f} MB, calibration {args.calib_samples} x 512")
    print("| scheme | wall s | peak RSS GiB | MB/s of checkpoint | RSS / largest layer | output GB |")
    print("|---|---|---|---|---|---|")
    for name, seconds, rss, out_bytes in rows:
        print(f"| {name} | {seconds:.1f} | {rss / 1024:.2f} | {total / seconds / 1e6:.0f} | "
              f"{rss * 2**20 / largest:.1f} | {out_bytes / 1e9:.2f} |")


if __name__ == "__main__":
    main()
