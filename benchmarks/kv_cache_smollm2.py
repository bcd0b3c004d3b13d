"""KV-cache quantization on the real SmolLM2-135M-Instruct (issue #21), with llm-compressor's KV-cache
quantization in the same run (run by hand, not in CI).

Our rows quantize layer-wise on the CPU through the real CLI in a child process, read the ascendv1 output back
(the reader quantizes K/V on their way into the cache and reads them back with the scale alone, as
vLLM-Ascend) and measure perplexity on 40 x 512 tokens of the evaluation half. Calibration: --calib_windows
windows of 512 tokens of the calibration half (default 32), the same file for every row and for llm-compressor.

    python benchmarks/kv_cache_smollm2.py --peer_python /tmp/lcvenv/bin/python

Rows (ours): float + C8; float + kv_smooth + C8; the shipped llama-w8a8 practice's process, without and with
C8 (its llama-w8a8c8 twin); the practice with kv_smooth before C8; float + our FP8 per-tensor KV cache (the
scheme vLLM reads from compressed-tensors), whose compressed-tensors export is also read back by
transformers + compressed-tensors in the peer's environment. Peer: llm-compressor's kv_cache_scheme (FP8 E4M3,
one static scale per tensor, the only KV scheme vLLM reads from compressed-tensors) alone, and with its RTN
W8A8 dynamic, next to RTN W8A8 dynamic without it.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from side_by_side import protocol, run_peer  # noqa: E402
from smollm2_accuracy import SCHEMES, quantize_in_child, write_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PRACTICES = ROOT / "msmodelslim" / "lab_practice" / "llama"
C8 = {"type": "dynamic_cache", "qconfig": {"dtype": "int8", "scope": "per_channel", "symmetric": True,
                                           "method": "minmax"}}
KV_FP8 = {"type": "dynamic_cache", "qconfig": {"dtype": "fp8_e4m3", "scope": "per_tensor", "symmetric": True,
                                               "method": "minmax"}}


def practice(name: str) -> list:
    return yaml.safe_load((PRACTICES / f"{name}.yaml").read_text())["spec"]["process"]


def ours() -> dict[str, tuple[list, str]]:
    """name: (process, saver)."""
    w8a8 = practice("llama-w8a8")
    return {
        "c8": (SCHEMES["c8"], "ascendv1_saver"),
        "kv_smooth+c8": (SCHEMES["kvs+c8"], "ascendv1_saver"),
        "practice llama-w8a8": (w8a8, "ascendv1_saver"),
        "practice llama-w8a8c8": (practice("llama-w8a8c8"), "ascendv1_saver"),
        "practice llama-w8a8 + kv_smooth + c8": (w8a8[:1] + [{"type": "kv_smooth"}] + w8a8[1:] + [C8],
                                                 "ascendv1_saver"),
        "kv_fp8 (compressed_tensors)": ([KV_FP8], "compressed_tensors"),
    }


PEER = ["kv_fp8", "rtn_w8a8_dynamic", "rtn_w8a8_dynamic+kv_fp8"]
DEFAULT_PEER = "kv_fp8"


def read_back(out: Path, saver: str):
    from msmodelslim.format.ascendv1.reader import load_ascendv1
    from msmodelslim.format.compressed_tensors.kv_cache import load_with_kv_cache

    return load_ascendv1(out) if saver == "ascendv1_saver" else load_with_kv_cache(out)


def peer_reads(peer_python: Path, out: Path, eval_path: Path, windows: int) -> float:
    """Perplexity of our compressed-tensors output as transformers + compressed-tensors run it (peer's venv)."""
    code = ("import sys, json, torch; from pathlib import Path; sys.path.insert(0, sys.argv[1]);"
            "from transformers import AutoModelForCausalLM, AutoTokenizer;"
            "from msmodelslim.app.evaluate import perplexity, token_windows;"
            "from msmodelslim.core.dataset import read_texts;"
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[2], dtype=torch.float32);"
            "assert hasattr(m.model.layers[0].self_attn, 'k_scale'), 'k_scale not loaded';"
            "w = token_windows(AutoTokenizer.from_pretrained(sys.argv[2]), read_texts(Path(sys.argv[3])), 512, int(sys.argv[4]));"
            "print(json.dumps({'ppl': perplexity(m, w, torch.device('cpu'), 'peer').perplexity}))")
    proc = subprocess.run([str(peer_python), "-c", code, str(ROOT), str(out), str(eval_path), str(windows)],
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"reading {out} with transformers + compressed-tensors failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["ppl"]


def main() -> None:
    from msmodelslim.app.evaluate import perplexity

    parser = argparse.ArgumentParser()
    parser.add_argument("--peer_python", type=Path, required=True, help="python of llm-compressor's environment")
    parser.add_argument("--work_dir", type=Path, default=Path.home() / ".cache" / "msmodelslim" / "kv_cache")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--calib_windows", type=int, default=32)
    parser.add_argument("--float_ppl", type=float, default=None,
                        help="the float model's perplexity on the same windows, from an earlier run (skips it)")
    parser.add_argument("--peer_read", action="store_true",
                        help="also read our compressed-tensors output with transformers + compressed-tensors (peer venv)")
    parser.add_argument("--rows", default=",".join(ours()), help="comma-separated, from: " + ", ".join(ours()))
    parser.add_argument("--peer", default=DEFAULT_PEER, help="comma-separated, from: " + ", ".join(PEER))
    parser.add_argument("--peers_first", action="store_true", help="run llm-compressor's recipes before ours")
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    model_dir, eval_path, windows, float_ppl, calib = protocol(args.work_dir, args.windows, args.calib_windows,
                                                                   args.float_ppl)

    table = []
    schemes = ours()

    def run_ours(i: int, name: str) -> None:
        process, saver = schemes[name]
        config = args.work_dir / f"ours{i}.yaml"
        write_config(config, process, str(calib), "layer_wise", saver)
        out = args.work_dir / f"smollm2-ours{i}"
        seconds, rss = quantize_in_child(model_dir, config, out)
        ppl = perplexity(read_back(out, saver), windows, torch.device("cpu"), name).perplexity
        note = ""
        if saver == "compressed_tensors" and args.peer_read:
            note = f"read by transformers + compressed-tensors: {peer_reads(args.peer_python, out, eval_path, args.windows):.4f}"
        print(f"msmodelslim {name}: ppl {ppl:.4f} (x{ppl / float_ppl:.4f}), {seconds:.1f} s, {rss:.0f} MiB {note}",
              flush=True)
        table.append(("msmodelslim", name, ppl, seconds, rss, note))

    def run_theirs(recipe: str) -> None:
        result = run_peer(args.peer_python, model_dir, calib, eval_path, recipe, args.windows)
        print(f"llm-compressor {recipe}: ppl {result['ppl']:.4f}, {result['seconds']:.1f} s, "
              f"{result['peak_rss_mib']:.0f} MiB", flush=True)
        table.append(("llm-compressor", recipe, result["ppl"], result["seconds"], result["peak_rss_mib"], ""))

    mine = [lambda i=i, n=n: run_ours(i, n) for i, n in enumerate(n for n in args.rows.split(",") if n)]
    peers = [lambda r=r: run_theirs(r) for r in args.peer.split(",") if r]
    for run in (peers + mine if args.peers_first else mine + peers):
        run()

    print("\n| tool | configuration | perplexity | vs float | quantize wall s | peak RSS MiB | note |")
    print("|---|---|---|---|---|---|---|")
    print(f"| - | float (fp32) | {float_ppl:.4f} | 1.0000 | - | - | |")
    for tool, name, ppl, seconds, rss, note in table:
        print(f"| {tool} | {name} | {ppl:.4f} | {ppl / float_ppl:.4f} | {seconds:.1f} | {rss:.0f} | {note} |")


if __name__ == "__main__":
    main()
