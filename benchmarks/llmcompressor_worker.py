"""Runs inside llm-compressor's own environment (not a project dependency); called by side_by_side.py.

Quantizes the float checkpoint in memory with an llm-compressor recipe on the given calibration texts, then
measures perplexity on the same evaluation windows as msmodelslim (its window code is imported from the repo,
which needs only torch and transformers). Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def recipe(name: str):
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform import SmoothQuantModifier

    if name == "rtn_w8a8_dynamic":
        return [QuantizationModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])]
    if name in ("kv_fp8", "rtn_w8a8_dynamic+kv_fp8"):  # vLLM's KV cache: FP8 E4M3, one static scale per tensor
        kv = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}
        if name == "kv_fp8":
            return [QuantizationModifier(kv_cache_scheme=kv)]
        return [QuantizationModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"], kv_cache_scheme=kv)]
    if name == "sq0.8_gptq_w8a8_dynamic":
        return [SmoothQuantModifier(smoothing_strength=0.8),
                GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])]
    if name in ("sq0.8_gptq_w8a8_static", "sq0.8_gptq_w8a8_static_down_dynamic"):
        groups = static_split_groups() if name.endswith("down_dynamic") else static_split_groups(split=False)
        return [SmoothQuantModifier(smoothing_strength=0.8),
                GPTQModifier(config_groups=groups, ignore=["lm_head"])]
    if name == "rtn_w8a8_static_down_dynamic":  # the split below without SmoothQuant and GPTQ: static ranges only
        return [QuantizationModifier(config_groups=static_split_groups(), ignore=["lm_head"])]
    if name in ("gptq_w4a16_g64", "awq_w4a16_g64", "gptq_w4a16_channel"):
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
        from llmcompressor.modifiers.awq import AWQModifier

        # Symmetric int4, as the ascendv1 W4A16 layout stores it (no zero points).
        if name.endswith("g64"):
            weight = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=64)
        else:
            weight = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="channel")
        groups = {"w4a16": QuantizationScheme(targets=["Linear"], weights=weight)}
        if name.startswith("awq"):
            return [AWQModifier(config_groups=groups, ignore=["lm_head"])]
        return [GPTQModifier(config_groups=groups, ignore=["lm_head"])]
    if name.lower() in FLOAT_PRESETS:  # the library's floating-point presets, round-to-nearest
        return [QuantizationModifier(targets="Linear", scheme=FLOAT_PRESETS[name.lower()], ignore=["lm_head"])]
    if name.startswith("gptq_") and name[5:].lower() in FLOAT_PRESETS:
        return [GPTQModifier(targets="Linear", scheme=FLOAT_PRESETS[name[5:].lower()], ignore=["lm_head"])]
    raise SystemExit(f"unknown recipe {name}")


def static_split_groups(split: bool = True) -> dict:
    """Static asymmetric per-tensor int8 inputs, per-channel int8 weights; with `split`, down_proj's inputs dynamic
    per token instead (the `static_split` scheme of side_by_side.py)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weight = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel")
    static = QuantizationArgs(num_bits=8, type="int", symmetric=False, strategy="tensor", dynamic=False)
    dynamic = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
    if not split:
        return {"static": QuantizationScheme(targets=["Linear"], weights=weight, input_activations=static)}
    return {"static": QuantizationScheme(targets=["re:.*(q|k|v|o|gate|up)_proj$"], weights=weight,
                                         input_activations=static),
            "down": QuantizationScheme(targets=["re:.*down_proj$"], weights=weight, input_activations=dynamic)}


# recipe name: compressed-tensors preset (FP8: per-channel weights, per-token dynamic activations; MX: E2M1
# elements in blocks of 32 with an E8M0 scale; NV: blocks of 16 with an FP8 scale and a per-tensor global scale)
FLOAT_PRESETS = {"fp8_dynamic": "FP8_DYNAMIC", "mxfp8": "MXFP8", "mxfp4": "MXFP4", "mxfp4a16": "MXFP4A16",
                 "nvfp4": "NVFP4", "nvfp4a16": "NVFP4A16"}


def allow_awq_on_cpu() -> None:
    """llm-compressor 0.14's AWQ pins its cached intermediates (for faster host-to-device copies); on a machine
    without an accelerator pin_memory fails. Making it a no-op changes no value, only where tensors live."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None


def main() -> None:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from msmodelslim.app.evaluate import perplexity, token_windows
    from msmodelslim.core.dataset import read_texts

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--calib", type=Path, required=True)
    parser.add_argument("--eval", type=Path, required=True)
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--save", type=Path, help="also save the quantized model there (compressed-tensors, as "
                                                  "llm-compressor writes it for vLLM), after the timed part")
    args = parser.parse_args()

    if args.recipe.startswith("awq"):
        allow_awq_on_cpu()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    texts = read_texts(args.calib)
    encoded = tokenizer(texts, truncation=True, max_length=512)
    dataset = Dataset.from_dict({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]})
    oneshot(model=model, dataset=dataset, recipe=recipe(args.recipe), max_seq_length=512,
            num_calibration_samples=len(texts))
    seconds = time.perf_counter() - started
    windows = token_windows(tokenizer, read_texts(args.eval), 512, args.windows)
    ppl = perplexity(model, windows, torch.device("cpu"), args.recipe)
    if args.save is not None:
        model.save_pretrained(args.save, save_compressed=True)
        tokenizer.save_pretrained(args.save)
    print(json.dumps({"recipe": args.recipe, "ppl": ppl.perplexity, "seconds": seconds,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


if __name__ == "__main__":
    main()
