"""Use case: perplexity of the float model and of a quantized checkpoint (ascendv1 or compressed-tensors) on the same
text windows."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from msmodelslim.core.dataset import read_texts, resolve_eval_dataset
from msmodelslim.core.errors import ConfigError, InvalidDatasetError
from msmodelslim.core.logging import get_logger, progress_disabled
from msmodelslim.core.memory import heap_reused
from msmodelslim.model.hf_config import load_hf_config, model_load_errors, require_local_dir

log = get_logger("app.evaluate")


@dataclass
class PerplexityResult:
    perplexity: float
    windows: int
    tokens: int
    seconds: float


def token_windows(tokenizer, texts: list[str], window: int, max_windows: int) -> list[torch.Tensor]:
    """Concatenate the texts (blank-line separated), tokenize once, cut into non-overlapping windows."""
    ids = tokenizer("\n\n".join(texts), return_tensors="pt")["input_ids"][0]
    count = min(max_windows, len(ids) // window)
    if count == 0:
        raise InvalidDatasetError(f"the evaluation text has {len(ids)} tokens, fewer than one window of {window}")
    return [ids[i * window : (i + 1) * window] for i in range(count)]


@torch.no_grad()
def perplexity(model: nn.Module, windows: list[torch.Tensor], device: torch.device, label: str) -> PerplexityResult:
    started = time.perf_counter()
    model.to(device)
    total_nll, total_tokens = 0.0, 0
    with heap_reused():  # every window allocates the same logits and activations (core/memory.py)
        for ids in tqdm(windows, desc=f"perplexity ({label})", unit="window", disable=progress_disabled()):
            ids = ids.unsqueeze(0).to(device)
            logits = model(input_ids=ids, use_cache=False).logits.float()
            nll = nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
            total_nll += nll.item()
            total_tokens += ids.shape[1] - 1
    return PerplexityResult(math.exp(total_nll / total_tokens), len(windows), total_tokens, time.perf_counter() - started)


def load_float_model(model_path: Path, trust_remote_code: bool) -> nn.Module:
    from transformers import AutoModelForCausalLM

    load_hf_config(model_path, trust_remote_code)  # config.json problems and remote code, with clear messages
    with model_load_errors(model_path, f"cannot load the float model from {model_path}"):
        model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=torch.float32, trust_remote_code=trust_remote_code, local_files_only=True
        )
    return model.eval()


def load_eval_texts(dataset: str) -> list[str]:
    """A path, or a built-in name of lab_eval/ or lab_calib/ (e.g. prose_eval.txt)."""
    return read_texts(resolve_eval_dataset(dataset))


def check_window(window: int, max_windows: int) -> None:
    if window < 2 or max_windows < 1:
        raise ConfigError("--window must be >= 2 and --max_windows >= 1")


ARCHITECTURE_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers")


def _check_same_architecture(model_config, quant_config, model_path: Path, quant_path: Path) -> None:
    """Both models see the same token windows: a checkpoint quantized from another model would only fail (or
    give a meaningless ratio) after the float run."""
    for key in ARCHITECTURE_KEYS:
        a, b = getattr(model_config, key, None), getattr(quant_config, key, None)
        if a is not None and b is not None and a != b:
            raise ConfigError(f"--quant_path {quant_path} was not quantized from --model_path {model_path}: "
                              f"config.json {key} is {b!r} there and {a!r} here")


def check_eval_inputs(model_path: Path, quant_path: Path, dataset: str, window: int, max_windows: int,
                      trust_remote_code: bool) -> tuple[Path, Path, list[str]]:
    """Every argument, before any weight is read: (model dir, checkpoint dir, evaluation texts)."""
    from msmodelslim.format.readers import check_quantized_checkpoint

    check_window(window, max_windows)
    model_path = require_local_dir(model_path, "--model_path")
    quant_path = require_local_dir(quant_path, "--quant_path")
    check_quantized_checkpoint(quant_path, "--quant_path", trust_remote_code)  # ascendv1 or compressed-tensors
    model_config = load_hf_config(model_path, trust_remote_code)
    _check_same_architecture(model_config, load_hf_config(quant_path, trust_remote_code), model_path, quant_path)
    return model_path, quant_path, load_eval_texts(dataset)


def evaluate(model_path: Path, quant_path: Path, dataset: str, device: torch.device, window: int = 512,
             max_windows: int = 40, trust_remote_code: bool = False) -> dict[str, PerplexityResult]:
    from transformers import AutoTokenizer

    from msmodelslim.format.readers import load_quantized_checkpoint
    from msmodelslim.ir.quant_linear import keep_decoded_weights

    model_path, quant_path, texts = check_eval_inputs(model_path, quant_path, dataset, window, max_windows,
                                                      trust_remote_code)
    with model_load_errors(model_path, f"cannot load the tokenizer from {model_path}"):
        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code,
                                                  local_files_only=True)
    windows = token_windows(tokenizer, texts, window, max_windows)
    results = {"float": perplexity(load_float_model(model_path, trust_remote_code), windows, device, "float")}
    quantized = keep_decoded_weights(load_quantized_checkpoint(quant_path, trust_remote_code))  # decoded once
    results["quantized"] = perplexity(quantized, windows, device, "quantized")
    return results
