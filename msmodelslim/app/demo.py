"""`msmodelslim demo`: the real SmolLM2-135M-Instruct, end to end on the CPU.

GGUF -> Hugging Face checkpoint -> W8A8 (per-token dynamic activations, per-channel int8 weights) layer-wise ->
ascendv1 on disk -> read back -> perplexity and one greedy sample from each model, in a before/after table.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from msmodelslim.app.evaluate import load_float_model, perplexity, token_windows
from msmodelslim.app.quantize import QuantizeRequest, quantize
from msmodelslim.core.dataset import read_texts
from msmodelslim.core.device import DeviceSpec
from msmodelslim.core.logging import get_logger
from msmodelslim.format.ascendv1.reader import load_ascendv1
from msmodelslim.model.gguf_import import convert_gguf, find_gguf

log = get_logger("app.demo")
PACKAGE_ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = """apiversion: modelslim_v1
spec:
  runner: layer_wise
  process:
    - type: linear_quant
      qconfig:
        act: {dtype: int8, scope: per_token, symmetric: true, method: minmax}
        weight: {dtype: int8, scope: per_channel, symmetric: true, method: minmax}
      include: ["*"]
      exclude: ["lm_head"]
  save:
    - type: ascendv1_saver
      part_file_size: 4
"""
PROMPT = "The Debian package manager"


def eval_text_path() -> Path:
    """The Debian reference eval half when this is a source checkout beside ../shared, else the shipped text."""
    for root in (Path.cwd(), PACKAGE_ROOT.parent):
        candidate = root.parent / "shared" / "corpora" / "debian-reference.eval.txt"
        if candidate.is_file():
            return candidate
    return PACKAGE_ROOT / "lab_eval" / "prose_eval.txt"


def dir_size_mib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*.safetensors")) / 2**20


def sample(model, tokenizer) -> str:
    ids = tokenizer(PROMPT, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True).replace("\n", " ")


def run_demo(work_dir: Path | None, max_windows: int = 40) -> None:
    from transformers import AutoTokenizer

    work_dir = (work_dir or Path.home() / ".cache" / "msmodelslim" / "demo").resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model_dir = convert_gguf(find_gguf(), work_dir / "SmolLM2-135M-Instruct")
    log.info("Hugging Face checkpoint ready in %s (%.0f s)", model_dir, time.perf_counter() - started)
    config_path = work_dir / "w8a8_dynamic.yaml"
    config_path.write_text(DEMO_CONFIG)
    quant_dir = work_dir / "SmolLM2-135M-Instruct-w8a8"
    report = quantize(QuantizeRequest(model_path=model_dir, save_path=quant_dir, model_type="SmolLM2-135M-Instruct",
                                      device=DeviceSpec("cpu"), config_path=config_path, overwrite=True))
    eval_path = eval_text_path()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    windows = token_windows(tokenizer, read_texts(eval_path), 512, max_windows)
    cpu = torch.device("cpu")
    float_model = load_float_model(model_dir, False)
    float_ppl, float_text = perplexity(float_model, windows, cpu, "float"), sample(float_model, tokenizer)
    del float_model
    quant_model = load_ascendv1(quant_dir)
    quant_ppl, quant_text = perplexity(quant_model, windows, cpu, "W8A8"), sample(quant_model, tokenizer)
    rows = [
        ("", "float (fp32)", "W8A8 dynamic"),
        ("perplexity", f"{float_ppl.perplexity:.3f}", f"{quant_ppl.perplexity:.3f} (x{quant_ppl.perplexity / float_ppl.perplexity:.4f})"),
        ("weights on disk", f"{dir_size_mib(model_dir):.0f} MiB", f"{dir_size_mib(quant_dir):.0f} MiB"),
        ("time", f"eval {float_ppl.seconds:.0f} s", f"quantize {report.seconds:.0f} s, eval {quant_ppl.seconds:.0f} s"),
    ]
    print(f"\nSmolLM2-135M-Instruct, {len(windows)} windows x 512 tokens of {eval_path.name}")
    for name, a, b in rows:
        print(f"  {name:16s} {a:24s} {b}")
    print(f"\n  float:     {float_text}\n  quantized: {quant_text}\n")
    print(f"quantized checkpoint: {quant_dir}")
