"""`msmodelslim eval` on compressed-tensors checkpoints, ours and llm-compressor's (run by hand, not in CI).

- `peer:<recipe>`: llm-compressor 0.14 quantizes SmolLM2 with one of its recipes (benchmarks/llmcompressor_worker.py)
  and measures perplexity on its own in-memory model (compressed-tensors' forward, activations fake-quantized by
  the library), then saves the checkpoint as vLLM reads it. Our compressed-tensors reader then scores that folder
  on the same windows. The two numbers agree where both tools compute the same arithmetic; where they differ, the
  reason is printed beside them.
- `ours:<scheme>`: one msmodelslim run saves ascendv1 and compressed-tensors; each folder is read by its reader.
  Both build the same QuantLinears, so the two perplexities must be equal.

    python benchmarks/read_compressed_tensors.py --peer_python /tmp/lcvenv/bin/python \
        --order peer:rtn_w8a8_dynamic,peer:fp8_dynamic,ours:w8a8_dynamic
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from side_by_side import protocol, run_peer  # noqa: E402
from smollm2_accuracy import SCHEMES, quantize_in_child, write_config  # noqa: E402


def score(path: Path, windows, label: str) -> tuple[float, float]:
    """(perplexity, seconds to read and evaluate) of a quantized checkpoint, as `msmodelslim eval` computes it."""
    from msmodelslim.app.evaluate import perplexity
    from msmodelslim.format.readers import check_quantized_checkpoint, load_quantized_checkpoint
    from msmodelslim.ir.quant_linear import keep_decoded_weights

    started = time.perf_counter()
    check_quantized_checkpoint(path, "--quant_path")
    model = keep_decoded_weights(load_quantized_checkpoint(path))
    ppl = perplexity(model, windows, torch.device("cpu"), label).perplexity
    return ppl, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--peer_python", type=Path, default=Path("/tmp/lcvenv/bin/python"))
    parser.add_argument("--order", default="peer:rtn_w8a8_dynamic,peer:fp8_dynamic,ours:w8a8_dynamic")
    parser.add_argument("--work_dir", type=Path, default=Path.home() / ".cache" / "msmodelslim" / "read_ct")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--calib_windows", type=int, default=64)
    parser.add_argument("--float_ppl", type=float, help="the float perplexity on these windows, from an earlier run")
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    model_dir, eval_path, windows, float_ppl, calib = protocol(args.work_dir, args.windows, args.calib_windows,
                                                              args.float_ppl)
    rows = []
    for item in args.order.split(","):
        tool, name = item.split(":", 1)
        if tool == "peer":
            out = args.work_dir / f"peer-{name}"
            result = run_peer(args.peer_python, model_dir, calib, eval_path, name, args.windows, save=out)
            ppl, seconds = score(out, windows, name)
            rows.append((item, "llm-compressor, in memory", result["ppl"], "msmodelslim eval of its saved folder",
                         ppl, seconds))
        else:
            config = args.work_dir / f"{name}.yaml"
            write_config(config, SCHEMES[name], str(calib), "layer_wise", saver="ascendv1_saver+compressed_tensors")
            out = args.work_dir / f"ours-{name}"
            quantize_in_child(model_dir, config, out)
            reference, _ = score(out / "ascendv1", windows, f"{name} ascendv1")
            ppl, seconds = score(out / "compressed_tensors", windows, f"{name} compressed-tensors")
            rows.append((item, "msmodelslim eval of the ascendv1 folder", reference,
                         "msmodelslim eval of the compressed-tensors folder", ppl, seconds))
        print(f"{rows[-1]}", flush=True)

    print(f"\nfloat ppl {float_ppl:.4f} on {len(windows)} windows of 512 tokens\n")
    print("| run | reference | its ppl (x float) | compressed-tensors read by | ppl (x float) | relative difference "
          "| read + eval s |")
    print("|---|---|---|---|---|---|---|")
    for item, ref_label, ref, label, ppl, seconds in rows:
        print(f"| {item} | {ref_label} | {ref:.4f} (x{ref / float_ppl:.4f}) | {label} | {ppl:.4f} "
              f"(x{ppl / float_ppl:.4f}) | {(ppl - ref) / ref:+.4%} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
