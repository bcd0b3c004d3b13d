"""FA3 int8 per-head on SmolLM2 (eval half, 40 x 512), on top of the shipped llama-w8a8 practice, calibrated on
mix_calib.jsonl as the C8 measurement was. Uses benchmarks/smollm2_accuracy.py's functions unchanged.

Usage: python benchmarks/fa3_smollm2.py [FLOAT_PPL|-] [ROWS, default all: w8a8,w8a8+fa3,fa3] [WORK_DIR]"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import smollm2_accuracy as bench

from transformers import AutoTokenizer
from msmodelslim.app.evaluate import load_float_model, perplexity, token_windows
from msmodelslim.core.dataset import read_texts
from msmodelslim.format.ascendv1.reader import load_ascendv1
from msmodelslim.model.gguf_import import convert_gguf, find_gguf

DYN = bench.linear({"act": bench.DYNAMIC, "weight": bench.WEIGHT_INT8})
FA3 = {"type": "fa3_quant", "qconfig": {"dtype": "int8", "scope": "per_head", "symmetric": True, "method": "minmax"}}
SCHEMES = {"w8a8+fa3": [bench.smooth(0.5), DYN, FA3], "fa3": [FA3], "w8a8": [bench.smooth(0.5), DYN]}
work = Path(sys.argv[3]) if len(sys.argv) > 3 else Path("/tmp/fa3_smollm2")
work.mkdir(parents=True, exist_ok=True)
model_dir = convert_gguf(find_gguf(), Path.home() / ".cache" / "msmodelslim" / "demo" / "SmolLM2-135M-Instruct")
tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
windows = token_windows(tokenizer, read_texts(bench.CORPORA / "debian-reference.eval.txt"), 512, 40)
float_ppl = float(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1] != "-" else perplexity(load_float_model(model_dir, False), windows, torch.device("cpu"), "float").perplexity
print(f"float ppl {float_ppl:.4f}", flush=True)
for name in (sys.argv[2].split(",") if len(sys.argv) > 2 else SCHEMES):
    config = work / f"{name}.yaml"
    bench.write_config(config, SCHEMES[name], "mix_calib.jsonl", "layer_wise")
    out = work / f"smollm2-{name}"
    seconds, rss = bench.quantize_in_child(model_dir, config, out)
    ppl = perplexity(load_ascendv1(out), windows, torch.device("cpu"), name).perplexity
    print(f"{name}: ppl {ppl:.4f} (x{ppl / float_ppl:.4f} of float), quantize {seconds:.1f} s, peak RSS {rss:.0f} MiB",
          flush=True)
