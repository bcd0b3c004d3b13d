"""Mixed precision under a bit budget vs uniform W4A16 g64 on the real SmolLM2-135M-Instruct (issue #23, run by
hand under the heavy-run lock, not in CI).

1. `analyze mixed` (in process) on windows of the *calibration* half of the Debian reference: per-linear scores of
   w4a16_g64, w8a16 and float, and the plan for each --bits budget (mixed_precision.yaml);
2. `quant` (the real CLI, in a child process) of uniform W4A16 g64 and of each plan, with the same weight method
   and calibration windows;
3. perplexity of the float model and of each checkpoint on 40 x 512 tokens of the *evaluation* half (as
   benchmarks/smollm2_accuracy.py computes it), the bits per weight the checkpoint really stores, and the
   predicted error (Σ‖ΔW x‖² over the decoder linears) next to the measured perplexity increase.

    flock /tmp/heavy.lock python benchmarks/mixed_precision_smollm2.py [--bits 4.75,5,6] [--weight_method minmax]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smollm2_accuracy import CORPORA, calibration_windows, quantize_in_child, write_config  # noqa: E402

SCHEMES = "w4a16_g64,w8a16,float"


def stored_bits(out: Path) -> float:
    """Bits per weight an ascendv1 checkpoint stores over its decoder-layer linears (app/mixed_budget.py's
    accounting: quantized tensors as stored, bias excluded; FLOAT weights at 16 bits)."""
    description = json.loads((out / "quant_model_description.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for file in out.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys() if ".layers." in k})
    bits = weights = 0
    for key, tag in description.items():
        if ".layers." not in key or not key.endswith((".weight", ".weight_packed")) or "norm" in key:
            continue
        linear = key.rsplit(".", 1)[0]
        if tag == "FLOAT":
            n, k = tensors[key].shape
            bits += 16 * n * k
        else:
            bits += sum(t.numel() * t.element_size() * 8 for name, t in tensors.items()
                        if name.rsplit(".", 1)[0] == linear and not name.endswith(".bias"))
            n, k = (tensors[f"{linear}.weight_shape"].tolist() if tag == "W4A16" else tensors[key].shape)
        weights += n * k
    return bits / weights


def main() -> None:
    from transformers import AutoTokenizer

    from msmodelslim.app.evaluate import load_float_model, perplexity, token_windows
    from msmodelslim.app.mixed_precision import MixedRequest, choose, score_linears
    from msmodelslim.core.dataset import read_texts
    from msmodelslim.format.ascendv1.reader import load_ascendv1
    from msmodelslim.model.gguf_import import convert_gguf, find_gguf

    parser = argparse.ArgumentParser()
    parser.add_argument("--bits", default="5", help="comma-separated budgets (average bits per weight)")
    parser.add_argument("--weight_method", default="minmax", choices=["minmax", "gptq", "ssz"])
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--calib_samples", type=int, default=128)
    parser.add_argument("--work_dir", type=Path, default=Path.home() / ".cache" / "msmodelslim" / "bench-mixed")
    parser.add_argument("--float_ppl", type=float, default=None, help="skip the float evaluation (earlier result)")
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)

    model_dir = convert_gguf(find_gguf(), Path.home() / ".cache" / "msmodelslim" / "demo" / "SmolLM2-135M-Instruct")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    windows = token_windows(tokenizer, read_texts(CORPORA / "debian-reference.eval.txt"), 512, args.windows)
    float_ppl = args.float_ppl or perplexity(load_float_model(model_dir, False), windows, torch.device("cpu"),
                                             "float").perplexity
    print(f"float: ppl {float_ppl:.4f} on {len(windows)} x 512 tokens of the eval half", flush=True)
    calib = calibration_windows(tokenizer, args.calib_samples, 512, args.work_dir / "calib_windows.jsonl")

    rows = []  # (label, predicted bits, predicted error, config)
    budgets = [float(b) for b in args.bits.split(",")]
    request = MixedRequest("SmolLM2-135M-Instruct", model_dir, min(budgets), SCHEMES, args.weight_method,
                           calib_dataset=str(calib), output=args.work_dir / "plan")
    started = time.perf_counter()
    scores = score_linears(request)  # one scoring pass serves every budget
    seconds = time.perf_counter() - started
    print(f"scored {len(scores.shapes)} linears x {len(scores.schemes)} schemes in {seconds:.1f} s", flush=True)
    for budget in budgets:
        result = choose(scores, request, budget, args.work_dir / f"plan-{budget:g}")
        counts = {s: sum(v == s for v in result.plan.values()) for s in SCHEMES.split(",")}
        print(f"plan {budget:g} bits: predicted {result.predicted_bits:.4f} bits, error {result.predicted_error:.6g}; "
              f"linears {counts}", flush=True)
        uniform_bits, uniform_error = result.uniform["w4a16_g64"]
        rows.append((f"mixed {budget:g} bits", result.predicted_bits, result.predicted_error,
                     Path(result.files["config"])))
    weight = {"dtype": "int4", "scope": "per_group", "symmetric": True, "method": args.weight_method,
              "ext": {"group_size": 64}}
    uniform = args.work_dir / "uniform_w4a16_g64.yaml"
    write_config(uniform, [{"type": "linear_quant", "qconfig": {"weight": weight}, "exclude": ["lm_head"]}],
                 str(calib), "layer_wise")
    rows.insert(0, ("uniform w4a16_g64", uniform_bits, uniform_error, uniform))

    table = []
    for label, bits, error, config in rows:
        out = args.work_dir / label.replace(" ", "_")
        seconds, rss = quantize_in_child(model_dir, config, out)
        ppl = perplexity(load_ascendv1(out), windows, torch.device("cpu"), label).perplexity
        table.append((label, bits, stored_bits(out), error, ppl, seconds))
        print(f"{label}: ppl {ppl:.4f}, stored {table[-1][2]:.4f} bits/weight, quantize {seconds:.1f} s", flush=True)

    print(f"\nweight method {args.weight_method}; calibration {args.calib_samples} x 512 tokens (calib half); "
          f"eval {len(windows)} x 512 tokens (eval half); float ppl {float_ppl:.4f}")
    print("| plan | predicted bits/weight | stored bits/weight | predicted error Σ‖ΔWx‖² | "
          "perplexity | Δppl vs float | predicted error / uniform's | Δppl / uniform's |")
    print("|---|---|---|---|---|---|---|---|")
    base_error, base_delta = table[0][3], table[0][4] - float_ppl
    for label, bits, stored, error, ppl, _ in table:
        print(f"| {label} | {bits:.4f} | {stored:.4f} | {error:.5g} | {ppl:.4f} | {ppl - float_ppl:+.4f} | "
              f"{error / base_error:.3f} | {(ppl - float_ppl) / base_delta:.3f} |")


if __name__ == "__main__":
    main()
