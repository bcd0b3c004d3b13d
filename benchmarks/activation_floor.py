"""What FP8 and MXFP8 cost on SmolLM2 before any weight method runs (issue #22; run by hand, not in CI).

The issue asks FP8 dynamic W8A8 for <= 1.005 x float and MXFP8 W8A8 for <= 1.01 x float. A weight method (GPTQ,
GPTAQ, AutoRound) can only move the weights; the activations are quantized at run time by the kernel. This probe
splits the cost: the float model with every linear but lm_head wrapped so that its input, its weight or both go
through the library's own quantizers (quantizer/float_formats.py: the functions our reader and scorers use), on
the same 40 x 512 windows of the evaluation half as smollm2_accuracy.py. No setting is chosen from these numbers.

Rows (each a perplexity ratio against float):
- `act_fp8`: activations E4M3 per token (s = max|x| / 448), weights float;
- `act_fp8+hadamard`: the same after an exact rotation of every linear's input (x -> Hx, W -> W Hᵀ, H a
  normalized Hadamard matrix of the input width, the rotation QuaRot's online variant applies), weights float;
- `weight_fp8`: E4M3 per output channel by round to nearest, activations float;
- `fp8_both`: both, which must equal the saved fp8_dynamic checkpoint read back (17.8130 in docs/benchmarks.md);
- the same four for MXFP8 (blocks of 32 along the input, the OCP shared-exponent rule the vLLM-Ascend kernel
  uses for activations), with a block-diagonal Hadamard of 32 (one MX block) as the rotation, on every linear or
  (`_but_down`) on all but down_proj, and `weight_mxfp8`/`mxfp8_both` with that rotation too.

The rotated rows rotate each linear's input as the model computes it, i.e. after the RMSNorm's weight γ. QuaRot
cannot: a rotation commutes with the norm only once γ is folded into the following linears, so behind QuaRot
q/k/v and gate/up see x / rms(x) without γ, rotated. `--fold_norms` does that fold first (float outputs
unchanged), so that its `_but_down` rows in blocks of 32 are what QuaRot in blocks of 32 reaches without
run-time rotations (the residual stream, and o_proj's input through v_proj per head).

    python benchmarks/activation_floor.py [--windows 40] [--rows act_fp8,act_mxfp8] [--fold_norms]
"""
from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from msmodelslim.processor.quarot.hadamard import block_diagonal, hadamard
from msmodelslim.quantizer.float_formats import fp8_fake_quantize_per_token, mx_fake_quantize

ROOT = Path(__file__).resolve().parents[1]
CORPORA = ROOT.parent / "shared" / "corpora"
DEMO_MODEL = Path.home() / ".cache" / "msmodelslim" / "demo" / "SmolLM2-135M-Instruct"
Quantizer = Callable[[torch.Tensor], torch.Tensor]


def mxfp8(x: torch.Tensor) -> torch.Tensor:
    return mx_fake_quantize(x, "fp8_e4m3")


@functools.lru_cache(maxsize=None)
def rotation(width: int, block: Optional[int]) -> torch.Tensor:
    """Normalized Hadamard of `width` (block None) or block-diagonal Hadamard blocks of `block`."""
    size = width if block is None else block
    h = hadamard(size)
    if h is None:
        raise SystemExit(f"no Hadamard matrix of order {size} is known to processor/quarot/hadamard.py")
    h = h / size**0.5
    return h if block is None else block_diagonal(h, width // block)


ROWS: dict[str, tuple[Optional[Quantizer], Optional[Quantizer], Optional[str]]] = {
    # name: (activation quantizer, weight quantizer (fp8: one scale per row, i.e. per output channel), rotation:
    # None, "full" or "block32" (every linear), "full_but_down" or "block32_but_down" (all but down_proj, whose
    # input only a run-time rotation reaches))
    "act_fp8": (fp8_fake_quantize_per_token, None, None),
    "act_fp8+hadamard": (fp8_fake_quantize_per_token, None, "full"),
    "act_fp8+hadamard_but_down": (fp8_fake_quantize_per_token, None, "full_but_down"),
    "act_fp8+hadamard32_but_down": (fp8_fake_quantize_per_token, None, "block32_but_down"),
    "weight_fp8": (None, fp8_fake_quantize_per_token, None),
    "fp8_both": (fp8_fake_quantize_per_token, fp8_fake_quantize_per_token, None),
    "act_mxfp8": (mxfp8, None, None),
    "act_mxfp8+hadamard32": (mxfp8, None, "block32"),
    "act_mxfp8+hadamard32_but_down": (mxfp8, None, "block32_but_down"),
    "weight_mxfp8": (None, mxfp8, None),
    "weight_mxfp8+hadamard32_but_down": (None, mxfp8, "block32_but_down"),
    "mxfp8_both": (mxfp8, mxfp8, None),
    "mxfp8_both+hadamard32_but_down": (mxfp8, mxfp8, "block32_but_down"),
}


def wrap_linears(model: nn.Module, act: Optional[Quantizer], weight: Optional[Quantizer],
                 rotate: Optional[str]) -> None:
    """In place: every nn.Linear but lm_head computes (weight(W Hᵀ)) · act(H x) (H = identity without rotate)."""
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name.endswith("lm_head"):
            continue
        h = None
        if rotate is not None and not (rotate.endswith("_but_down") and name.endswith("down_proj")):
            h = rotation(module.in_features, None if rotate.startswith("full") else 32).float()
            module.weight.data = module.weight.data @ h.T
        if weight is not None:
            module.weight.data = weight(module.weight.data)

        def pre_hook(mod, args, h=h):
            x = args[0]
            if h is not None:
                x = x @ h.T
            return (act(x) if act is not None else x,) + tuple(args[1:])

        module.register_forward_pre_hook(pre_hook)


def fold_norms(model: nn.Module) -> None:
    """In place: each decoder layer's RMSNorm weight γ moved into the linears it feeds (W -> W·diag(γ), γ -> 1).
    Float outputs are unchanged; the inputs those linears see become x / rms(x) without γ, which is what they see
    behind QuaRot (a rotation commutes with the norm only once γ is folded away)."""
    for layer in model.model.layers:
        for norm, linears in ((layer.input_layernorm, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                              (layer.post_attention_layernorm, ("mlp.gate_proj", "mlp.up_proj"))):
            for name in linears:
                layer.get_submodule(name).weight.data *= norm.weight.data.float()
            norm.weight.data.fill_(1.0)


def main() -> None:
    from transformers import AutoTokenizer

    from msmodelslim.app.evaluate import load_float_model, perplexity, token_windows
    from msmodelslim.core.dataset import read_texts

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from: {', '.join(ROWS)}")
    parser.add_argument("--model", type=Path, default=DEMO_MODEL)
    parser.add_argument("--fold_norms", action="store_true",
                        help="move every decoder norm's weight into the linears it feeds before wrapping them")
    args = parser.parse_args()
    rows = args.rows.split(",")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; known: {', '.join(ROWS)}")

    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    windows = token_windows(tokenizer, read_texts(CORPORA / "debian-reference.eval.txt"), 512, args.windows)
    started = time.perf_counter()
    float_ppl = perplexity(load_float_model(args.model, False), windows, torch.device("cpu"), "float").perplexity
    print(f"float: {float_ppl:.4f} ({time.perf_counter() - started:.1f} s)", flush=True)
    results = []
    for row in rows:
        model = load_float_model(args.model, False)
        started = time.perf_counter()
        with torch.no_grad():
            if args.fold_norms:
                fold_norms(model)
            wrap_linears(model, *ROWS[row])
        ppl = perplexity(model, windows, torch.device("cpu"), row).perplexity
        results.append((row, ppl))
        print(f"{row}: {ppl:.4f} (x{ppl / float_ppl:.4f}, {time.perf_counter() - started:.1f} s)", flush=True)
    folded = ", norms folded into the linears" if args.fold_norms else ""
    print(f"\n| probe ({len(windows)} x 512 eval windows, every linear but lm_head{folded}) | perplexity | vs float |")
    print("|---|---|---|")
    print(f"| float (fp32) | {float_ppl:.4f} | 1 |")
    for row, ppl in results:
        print(f"| {row} | {ppl:.4f} | {ppl / float_ppl:.4f} |")


if __name__ == "__main__":
    main()
