"""4-bit weights on SmolLM2-135M-Instruct: our weight methods and llm-compressor's GPTQ and AWQ, one command
(run by hand, not in CI).

    python benchmarks/low_bit.py --peer_python /tmp/lcvenv/bin/python \
        --ours w4a16_g64,w4a16_g64_ssz,w4a16_g64_gptq --peers gptq_w4a16_g64,awq_w4a16_g64

Same protocol as side_by_side.py: float32 model, 128 x 512 calibration tokens from the calibration half,
perplexity on 40 x 512 tokens of the evaluation half. Every row gets its ratio to float and to the best peer
perplexity of this run, and its wall time as a ratio to llm-compressor's GPTQ time of this run (the first peer
whose name starts with "gptq"). Timings are only comparable when nothing else runs on the machine.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from side_by_side import protocol, run_peer
from smollm2_accuracy import SCHEMES, quantize_in_child, write_config


def main() -> None:

    from msmodelslim.app.evaluate import perplexity
    from msmodelslim.format.ascendv1.reader import load_ascendv1

    parser = argparse.ArgumentParser()
    parser.add_argument("--peer_python", type=Path, help="python of llm-compressor's environment")
    parser.add_argument("--ours", default="w4a16_g64,w4a16_g64_ssz,w4a16_g64_gptq",
                        help=f"comma-separated, from: {', '.join(SCHEMES)}")
    parser.add_argument("--peers", default="gptq_w4a16_g64,awq_w4a16_g64", help="llm-compressor recipes; '' for none")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--work_dir", type=Path, default=Path.home() / ".cache" / "msmodelslim" / "low_bit")
    args = parser.parse_args()
    peers = [p for p in args.peers.split(",") if p]
    ours = [o for o in args.ours.split(",") if o]
    if peers and args.peer_python is None:
        parser.error("--peers needs --peer_python")
    unknown = [o for o in ours if o not in SCHEMES]
    if unknown:
        parser.error(f"unknown scheme(s) {unknown}")
    args.work_dir.mkdir(parents=True, exist_ok=True)

    model_dir, eval_path, windows, float_ppl, calib = protocol(args.work_dir, args.windows)

    rows = []  # (tool, name, ppl, seconds, rss MiB)
    for recipe in peers:
        result = run_peer(args.peer_python, model_dir, calib, eval_path, recipe, args.windows)
        rows.append(("llm-compressor", recipe, result["ppl"], result["seconds"], result["peak_rss_mib"]))
        print(f"llm-compressor {recipe}: ppl {result['ppl']:.4f}, {result['seconds']:.1f} s", flush=True)
    for name in ours:
        config = args.work_dir / f"{name}.yaml"
        write_config(config, SCHEMES[name], str(calib), "layer_wise")
        seconds, rss = quantize_in_child(model_dir, config, args.work_dir / f"smollm2-{name}")
        ppl = perplexity(load_ascendv1(args.work_dir / f"smollm2-{name}"), windows, torch.device("cpu"), name)
        rows.append(("msmodelslim", name, ppl.perplexity, seconds, rss))
        print(f"msmodelslim {name}: ppl {ppl.perplexity:.4f}, {seconds:.1f} s", flush=True)

    best_peer = min((r[2] for r in rows if r[0] == "llm-compressor"), default=None)
    gptq_seconds = next((r[3] for r in rows if r[0] == "llm-compressor" and r[1].startswith("gptq")), None)
    print(f"\nfloat perplexity {float_ppl:.4f}\n")
    print("| tool | scheme | ppl | vs float | vs best peer | wall s | vs peer GPTQ time | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for tool, name, ppl, seconds, rss in rows:
        vs_peer = f"{ppl / best_peer:.4f}" if best_peer else "-"
        vs_time = f"{seconds / gptq_seconds:.3f}" if gptq_seconds else "-"
        print(f"| {tool} | {name} | {ppl:.4f} | {ppl / float_ppl:.4f} | {vs_peer} | {seconds:.1f} | {vs_time} "
              f"| {rss:.0f} |")


if __name__ == "__main__":
    main()
