"""`msmodelslim demo`: the real SmolLM2-135M-Instruct, end to end on the CPU.

GGUF -> Hugging Face checkpoint (cached) -> the shipped best practice for `--quant_type w8a8` (what a user gets
from the one-line command), layer-wise -> ascendv1 on disk -> read back -> perplexity and one greedy sample from
each model, in a before/after table with the wall time of every step. The float model's perplexity and sample
are computed once and cached, keyed by the model files, the evaluation text and the window settings.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from msmodelslim.app.evaluate import PerplexityResult, load_float_model, perplexity, token_windows
from msmodelslim.app.practice import select_practice
from msmodelslim.app.quantize import quantize
from msmodelslim.app.quantize_request import QuantizeRequest
from msmodelslim.core.dataset import read_texts
from msmodelslim.core.device import DeviceSpec
from msmodelslim.core.logging import get_logger
from msmodelslim.core.progress import spinner
from msmodelslim.format.ascendv1.reader import load_ascendv1
from msmodelslim.ir.quant_linear import keep_decoded_weights
from msmodelslim.model.gguf_import import convert_gguf, find_gguf
from msmodelslim.model.registry import lookup

log = get_logger("app.demo")
PACKAGE_ROOT = Path(__file__).resolve().parent.parent
MODEL_TYPE = "SmolLM2-135M-Instruct"
QUANT_TYPE = "w8a8"
PROMPT = "The Debian package manager"
WINDOW = 512
FLOAT_CACHE = "float_reference.json"


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


def float_cache_key(model_dir: Path, eval_path: Path, max_windows: int) -> str:
    """Changes when the model files, the evaluation text, the windows or the torch version change."""
    files = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(model_dir.iterdir()) if p.is_file()]
    text = hashlib.sha256(eval_path.read_bytes()).hexdigest()
    return hashlib.sha256(json.dumps([files, text, WINDOW, max_windows, torch.__version__]).encode()).hexdigest()


@dataclass
class FloatReference:
    perplexity: PerplexityResult
    sample: str
    cached: bool


def float_reference(model_dir: Path, tokenizer, windows, cache: Path, key: str) -> FloatReference:
    if cache.is_file():
        try:
            saved = json.loads(cache.read_text())
            if saved.get("key") == key:
                return FloatReference(PerplexityResult(**saved["perplexity"]), saved["sample"], True)
        except (ValueError, KeyError, TypeError):
            pass  # a damaged cache is recomputed
    with spinner("loading the float model"):
        model = load_float_model(model_dir, False)
    result = perplexity(model, windows, torch.device("cpu"), "float")
    with spinner("float model: greedy sample"):
        text = sample(model, tokenizer)
    cache.write_text(json.dumps({"key": key, "perplexity": result.__dict__, "sample": text}))
    return FloatReference(result, text, False)


def run_demo(work_dir: Path | None, max_windows: int = 40, started_at: float | None = None) -> None:
    from transformers import AutoTokenizer

    started_at = started_at or time.time()
    steps: list[tuple[str, float]] = []

    def step_done(name: str, since: float) -> None:
        steps.append((name, time.perf_counter() - since))

    work_dir = (work_dir or Path.home() / ".cache" / "msmodelslim" / "demo").resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    with spinner(f"SmolLM2-135M-Instruct as a Hugging Face checkpoint in {work_dir}"):
        model_dir = convert_gguf(find_gguf(), work_dir / MODEL_TYPE)
    step_done("model ready (GGUF converted once, then cached)", t)

    practice = select_practice(MODEL_TYPE, lookup(MODEL_TYPE).pedigree, QUANT_TYPE)
    name = practice.metadata.config_id
    print(f"practice for --quant_type {QUANT_TYPE}: {name}: {practice.metadata.description}", flush=True)
    t = time.perf_counter()
    quant_dir = work_dir / f"{MODEL_TYPE}-{QUANT_TYPE}"
    report = quantize(QuantizeRequest(model_path=model_dir, save_path=quant_dir, model_type=MODEL_TYPE,
                                      device=DeviceSpec("cpu"), quant_type=QUANT_TYPE, overwrite=True))
    step_done(f"quantize ({name})", t)

    eval_path = eval_text_path()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    windows = token_windows(tokenizer, read_texts(eval_path), WINDOW, max_windows)
    if len(windows) < max_windows:
        print(f"the evaluation text holds {len(windows)} windows of {WINDOW} tokens (asked for {max_windows})")
    t = time.perf_counter()
    key = float_cache_key(model_dir, eval_path, max_windows)
    reference = float_reference(model_dir, tokenizer, windows, work_dir / FLOAT_CACHE, key)
    step_done("float perplexity and sample" + (" (cached)" if reference.cached else ""), t)

    t = time.perf_counter()
    with spinner("reading the quantized checkpoint back"):
        quant_model = keep_decoded_weights(load_ascendv1(quant_dir))  # decoded once, not per token
    quant_ppl = perplexity(quant_model, windows, torch.device("cpu"), QUANT_TYPE.upper())
    with spinner("quantized model: greedy sample"):
        quant_text = sample(quant_model, tokenizer)
    step_done("quantized perplexity and sample (read back from disk)", t)

    float_ppl = reference.perplexity
    scheme = report.description.get("model_quant_type", QUANT_TYPE)
    print(f"\nSmolLM2-135M-Instruct, {len(windows)} windows x {WINDOW} tokens of {eval_path.name}")
    rows = [
        ("", "float (fp32)", f"{scheme} ({name})"),
        ("perplexity", f"{float_ppl.perplexity:.3f}",
         f"{quant_ppl.perplexity:.3f} (x{quant_ppl.perplexity / float_ppl.perplexity:.4f})"),
        ("weights on disk", f"{dir_size_mib(model_dir):.0f} MiB", f"{dir_size_mib(quant_dir):.0f} MiB"),
        ("eval time", f"{float_ppl.seconds:.0f} s" + (" (cached)" if reference.cached else ""),
         f"{quant_ppl.seconds:.0f} s"),
    ]
    for label, a, b in rows:
        print(f"  {label:16s} {a:24s} {b}")
    print(f"\n  float:     {reference.sample}\n  quantized: {quant_text}\n")
    print("wall time of each step:")
    for label, seconds in steps:
        print(f"  {seconds:7.1f} s  {label}")
    print(f"  {time.time() - started_at:7.1f} s  total, start-up included")
    print(f"\nquantized checkpoint: {quant_dir}\nfloat checkpoint:     {model_dir}")
