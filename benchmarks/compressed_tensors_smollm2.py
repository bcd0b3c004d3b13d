"""compressed-tensors output of the real SmolLM2-135M-Instruct, loaded by transformers (run by hand).

For each scheme: quantize twice from the same config, once to ascendv1 and once to compressed-tensors; read
the first with our reader and the second with transformers' compressed-tensors integration; print both
perplexities on the evaluation half (40 x 512 tokens), their ratio, and a greedy sample from the transformers
model.

    python benchmarks/compressed_tensors_smollm2.py [--schemes w8a8_dynamic,w4a16_g64]

Note: for dynamic activations the compressed-tensors library emulates per-token int8 with scale
max|x|/127.5, vLLM's kernel and our reader with max|x|/127, so the two perplexities differ slightly there.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from smollm2_accuracy import CORPORA, SCHEMES, calibration_windows, quantize_in_child, write_config  # noqa: E402


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from msmodelslim.app.evaluate import perplexity, token_windows
    from msmodelslim.core.dataset import read_texts
    from msmodelslim.format.ascendv1.reader import load_ascendv1
    from msmodelslim.model.gguf_import import convert_gguf, find_gguf

    parser = argparse.ArgumentParser()
    parser.add_argument("--schemes", default="w8a8_dynamic,w4a16_g64")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--work_dir", type=Path, default=Path.home() / ".cache" / "msmodelslim" / "ct_bench")
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    model_dir = convert_gguf(find_gguf(), Path.home() / ".cache" / "msmodelslim" / "demo" / "SmolLM2-135M-Instruct")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    windows = token_windows(tokenizer, read_texts(CORPORA / "debian-reference.eval.txt"), 512, args.windows)
    calib = calibration_windows(tokenizer, 128, 512, args.work_dir / "calib_windows.jsonl")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is a Debian package?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    print("| scheme | ppl, our reader (ascendv1) | ppl, transformers (compressed-tensors) | ratio |")
    print("|---|---|---|---|")
    samples = []
    for name in args.schemes.split(","):
        outs = {}
        for saver in ("ascendv1_saver", "compressed_tensors"):
            config = args.work_dir / f"{name}-{saver}.yaml"
            write_config(config, SCHEMES[name], str(calib), "layer_wise", saver)
            outs[saver] = args.work_dir / f"smollm2-{name}-{saver}"
            quantize_in_child(model_dir, config, outs[saver])
        ours = perplexity(load_ascendv1(outs["ascendv1_saver"]), windows, torch.device("cpu"), name).perplexity
        model = AutoModelForCausalLM.from_pretrained(outs["compressed_tensors"], dtype=torch.float32, local_files_only=True)
        theirs = perplexity(model, windows, torch.device("cpu"), name).perplexity
        print(f"| {name} | {ours:.4f} | {theirs:.4f} | {theirs / ours:.4f} |", flush=True)
        with torch.no_grad():
            out = model.generate(**prompt, max_new_tokens=40, do_sample=False)
        samples.append((name, tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)))
    for name, text in samples:
        print(f"\n{name} (transformers, compressed-tensors): {text!r}")


if __name__ == "__main__":
    main()
