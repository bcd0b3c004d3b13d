"""Use case: agreement of a quantized vision-language model with its float model on held-out image+prompt pairs.

Perplexity on plain text says little about a VLM (it never looks at an image), so `msmodelslim eval` on a VLM
asks what the user sees: for each held-out image+prompt, the float model answers greedily (`--max_new_tokens`
tokens at most); then prompt+answer is teacher-forced through each model and compared with the float model:
- answer CE: mean -log p(token) over the float model's own answer tokens (nats/token). For the float model it
  is its own confidence; the gap (model - float) is what quantization costs on those answers;
- KL(float || model): mean over every position of prompt and answer (image tokens included) of
  sum_v p_float(v) (log p_float(v) - log p_model(v)), in nats;
- top-1: the share of answer positions where the model's most likely token is the float model's answer token.
The float row is the float model measured against its own stored log-probabilities through the same code:
exactly 0 gap and 0 KL.

Memory: the two models are never held together. The float model's log-probabilities of each sample go to a
temporary directory (one file per sample) and are read back while the quantized model runs.

Held-out data: the built-in `evalImages` (lab_eval/make_eval_images.py: same kinds of picture as the
calibration set calibImages, other content and seeds) by default, or any image dataset in the forms calibration
takes (core/vlm_dataset.py). A bare name is a path, then a built-in set of lab_eval/ (never of lab_calib/: to
evaluate on calibration images, give their path).
"""
from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from tqdm import tqdm

from msmodelslim.core.dataset import LAB_EVAL
from msmodelslim.core.errors import ConfigError, InvalidDatasetError
from msmodelslim.core.logging import get_logger, progress_disabled
from msmodelslim.core.vlm_dataset import VlmCalibSample, load_vlm_samples
from msmodelslim.model.hf_config import load_hf_config, model_load_errors, require_local_dir

log = get_logger("app.evaluate_vlm")

DEFAULT_EVAL_IMAGES = "evalImages"
DEFAULT_TEXT = "Describe this image in detail."  # the prompt of an image that comes without one
TEXT_ARCHITECTURE_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers")


@dataclass
class AgreementResult:
    label: str
    answer_ce: float  # nats per answer token, of the float model's greedy answers
    kl: float  # KL(float || model), nats per position (prompt and answer)
    top1: float  # share of answer positions whose argmax is the float model's answer token
    answer_tokens: int
    positions: int
    seconds: float


@dataclass
class VlmEvalReport:
    dataset: str
    samples: int
    max_new_tokens: int
    float: AgreementResult
    quantized: AgreementResult

    def table(self) -> str:
        f = self.float
        lines = [f"held-out image+prompt pairs: {self.samples} ({self.dataset}); float greedy answers: "
                 f"{f.answer_tokens} tokens (at most {self.max_new_tokens} per sample); {f.positions} positions "
                 f"compared",
                 f"{'model':<10} {'answer CE':>10} {'CE gap':>9} {'KL(float||model)':>17} {'top-1':>7} {'time s':>7}"]
        for row in (self.float, self.quantized):
            lines.append(f"{row.label:<10} {row.answer_ce:>10.4f} {row.answer_ce - f.answer_ce:>+9.4f} "
                         f"{row.kl:>17.6f} {100 * row.top1:>6.1f}% {row.seconds:>7.1f}")
        lines.append("answer CE: nats/token of the float model's own greedy answers, teacher-forced; KL: nats per "
                     "prompt+answer position; top-1: answer positions whose argmax is the float model's token")
        return "\n".join(lines)


# ---- which checkpoints this serves ------------------------------------------------------------------------------
def is_vlm_checkpoint(model_path: Path) -> bool:
    """Whether config.json's model_type is served by a vision-language adapter (the registry's `is_vlm`). Any
    problem reading it answers False: the text evaluation then names the problem."""
    from msmodelslim.model.registry import adapter_class, hf_families

    try:
        hf_type = json.loads((Path(model_path) / "config.json").read_text(encoding="utf-8")).get("model_type")
        names = hf_families().get(hf_type, []) if isinstance(hf_type, str) else []
        return any(getattr(adapter_class(name), "is_vlm", False) for name in names)
    except Exception:  # unreadable or odd config.json, an adapter that does not import: not for us to report
        return False


# ---- arguments, checked before any weight is read ---------------------------------------------------------------
def check_generation(max_samples: int, max_new_tokens: int) -> None:
    if max_samples < 1:
        raise ConfigError(f"--max_samples must be >= 1 (got {max_samples})")
    if max_new_tokens < 1:
        raise ConfigError(f"--max_new_tokens must be >= 1 (got {max_new_tokens})")


def builtin_eval_image_sets() -> list[str]:
    return sorted(p.name for p in LAB_EVAL.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))


def resolve_eval_images(dataset: Optional[str]) -> Path:
    """A path (absolute, or relative to the working directory), else a built-in set of lab_eval/."""
    name = dataset or DEFAULT_EVAL_IMAGES
    given = Path(name).expanduser()
    candidates = [given] if given.is_absolute() else [Path.cwd() / given, LAB_EVAL / given]
    found = next((c for c in candidates if c.exists()), None)
    if found is None:
        raise InvalidDatasetError(f"--dataset {name!r} not found (looked in: {', '.join(map(str, candidates))}); "
                                  f"a VLM is evaluated on an image dataset (an index.jsonl, or a directory of images "
                                  f"with or without one .json/.jsonl of {{image, text}} entries); built-in: "
                                  f"{', '.join(builtin_eval_image_sets())}")
    return found.resolve()


def _text_config(config):
    return getattr(config, "text_config", None) or config


def check_same_vlm(model_path: Path, quant_path: Path, trust_remote_code: bool) -> None:
    """The checkpoint was quantized from this model: same model_type and text decoder shape."""
    model_config = load_hf_config(model_path, trust_remote_code)
    quant_config = load_hf_config(quant_path, trust_remote_code)
    pairs = [("model_type", model_config, quant_config)] + [
        (f"text_config.{k}", _text_config(model_config), _text_config(quant_config)) for k in TEXT_ARCHITECTURE_KEYS]
    for key, a_config, b_config in pairs:
        attribute = key.rpartition(".")[2]
        a, b = getattr(a_config, attribute, None), getattr(b_config, attribute, None)
        if a is not None and b is not None and a != b:
            raise ConfigError(f"--quant_path {quant_path} was not quantized from --model_path {model_path}: "
                              f"config.json {key} is {b!r} there and {a!r} here")


@dataclass
class VlmEvalInputs:
    model_path: Path
    quant_path: Path
    dataset: Path
    samples: list[VlmCalibSample]
    adapter: object  # the model's VLM adapter: its processor turns a sample into model inputs


def check_vlm_eval_inputs(model_path: Path, quant_path: Path, dataset: Optional[str], max_samples: int,
                          max_new_tokens: int, trust_remote_code: bool = False,
                          default_text: str = DEFAULT_TEXT) -> VlmEvalInputs:
    """Every argument, before any weight is read: numbers, both directories, the checkpoint (ascendv1 description or
    compressed-tensors quantization_config, and tensor headers), the architectures, every image decoded, the
    processor built."""
    from msmodelslim.format.readers import check_quantized_checkpoint
    from msmodelslim.model.registry import create_adapter, infer_model_type

    check_generation(max_samples, max_new_tokens)
    model_path = require_local_dir(model_path, "--model_path")
    quant_path = require_local_dir(quant_path, "--quant_path")
    check_quantized_checkpoint(quant_path, "--quant_path", trust_remote_code)  # ascendv1 or compressed-tensors
    check_same_vlm(model_path, quant_path, trust_remote_code)
    found = resolve_eval_images(dataset)
    samples = load_vlm_samples(str(found), default_text)[:max_samples]
    adapter = create_adapter(infer_model_type(model_path), str(model_path), trust_remote_code)  # headers only
    return VlmEvalInputs(model_path, quant_path, found, samples, adapter)


# ---- measuring --------------------------------------------------------------------------------------------------
def teacher_forced(batch: dict[str, torch.Tensor], sequence: torch.Tensor) -> dict[str, torch.Tensor]:
    """The model inputs of prompt + answer: input_ids replaced, the per-token tensors of the prompt (attention
    mask, multimodal token types) extended over the answer (attended; text tokens), the image tensors as they are."""
    prompt = batch["input_ids"].shape[1]
    extra = sequence.shape[0] - prompt
    forced = {}
    for key, value in batch.items():
        if key == "input_ids":
            forced[key] = sequence.unsqueeze(0)
        elif value.dim() == 2 and value.shape == batch["input_ids"].shape:
            fill = torch.ones if key == "attention_mask" else torch.zeros
            forced[key] = torch.cat([value, fill((1, extra), dtype=value.dtype, device=value.device)], dim=1)
        else:
            forced[key] = value
    return forced


@torch.no_grad()
def log_probs(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """[positions - 1, vocab] float32 log-probabilities of the next token at every position but the last."""
    logits = model(**inputs, use_cache=False).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1).cpu()


@dataclass
class _Totals:
    nll: float = 0.0
    kl: float = 0.0
    top1: int = 0
    answer_tokens: int = 0
    positions: int = 0

    def add(self, reference: torch.Tensor, candidate: torch.Tensor, answer: torch.Tensor) -> None:
        """reference/candidate: [positions, vocab] log-probs; answer: the answer tokens, predicted by the last
        len(answer) positions."""
        at_answer = candidate[-len(answer):]
        self.nll -= at_answer.gather(1, answer[:, None]).sum().item()
        self.top1 += int((at_answer.argmax(dim=-1) == answer).sum().item())
        p = reference.exp()
        self.kl += torch.where(p > 0, p * (reference - candidate), 0.0).sum().item()  # 0 log 0 = 0
        self.answer_tokens += len(answer)
        self.positions += reference.shape[0]

    def result(self, label: str, seconds: float) -> AgreementResult:
        return AgreementResult(label, self.nll / self.answer_tokens, self.kl / self.positions,
                               self.top1 / self.answer_tokens, self.answer_tokens, self.positions, seconds)


def load_float_vlm(model_path: Path, trust_remote_code: bool) -> nn.Module:
    import transformers
    from transformers import AutoModelForImageTextToText

    from msmodelslim.model.vlm_omni import THINKER_CLASSES

    model_type = load_hf_config(model_path, trust_remote_code).model_type
    model_class = AutoModelForImageTextToText  # an Omni checkpoint: its thinker (model/vlm_omni.py)
    if model_type in THINKER_CLASSES:
        model_class = getattr(transformers, THINKER_CLASSES[model_type])
    with model_load_errors(model_path, f"cannot load the float model from {model_path}"):
        model = model_class.from_pretrained(
            model_path, dtype=torch.float32, trust_remote_code=trust_remote_code, local_files_only=True)
    return model.eval()


@torch.no_grad()
def float_pass(model: nn.Module, batches: list[dict[str, torch.Tensor]], max_new_tokens: int, device: torch.device,
               store: Path) -> AgreementResult:
    """Greedy answers of the float model; its teacher-forced log-probs stored per sample; its own row."""
    started = time.perf_counter()
    model.to(device)
    pad = getattr(model.generation_config, "pad_token_id", None)
    totals = _Totals()
    for number, batch in enumerate(tqdm(batches, desc="float: answer and score", unit="sample",
                                        disable=progress_disabled())):
        batch = {k: v.to(device) for k, v in batch.items()}
        generated = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                   pad_token_id=0 if pad is None else pad)[0]
        answer = generated[batch["input_ids"].shape[1]:].cpu()
        forced = teacher_forced(batch, generated)
        reference = log_probs(model, forced)
        torch.save({"inputs": {k: v.cpu() for k, v in forced.items()}, "answer": answer, "log_probs": reference},
                   store / f"{number}.pt")
        totals.add(reference, torch.load(store / f"{number}.pt")["log_probs"], answer)  # as the quantized row reads it
    return totals.result("float", time.perf_counter() - started)


@torch.no_grad()
def quantized_pass(model: nn.Module, count: int, device: torch.device, store: Path, label: str) -> AgreementResult:
    started = time.perf_counter()
    model.to(device)
    totals = _Totals()
    for number in tqdm(range(count), desc=f"{label}: score", unit="sample", disable=progress_disabled()):
        stored = torch.load(store / f"{number}.pt")
        candidate = log_probs(model, {k: v.to(device) for k, v in stored["inputs"].items()})
        totals.add(stored["log_probs"], candidate, stored["answer"])
    return totals.result(label, time.perf_counter() - started)


def evaluate_vlm(model_path: Path, quant_path: Path, dataset: Optional[str], device: torch.device,
                 max_samples: int = 8, max_new_tokens: int = 32, trust_remote_code: bool = False,
                 default_text: str = DEFAULT_TEXT) -> VlmEvalReport:
    from msmodelslim.format.readers import load_quantized_checkpoint
    from msmodelslim.ir.quant_linear import keep_decoded_weights

    inputs = check_vlm_eval_inputs(model_path, quant_path, dataset, max_samples, max_new_tokens, trust_remote_code,
                                   default_text)
    batches = inputs.adapter.handle_dataset(inputs.samples, torch.device("cpu"))
    with tempfile.TemporaryDirectory(prefix="msmodelslim_vlm_eval_") as scratch:
        store = Path(scratch)
        float_model = load_float_vlm(inputs.model_path, trust_remote_code)
        float_row = float_pass(float_model, batches, max_new_tokens, device, store)
        del float_model  # never both models at once
        quantized = keep_decoded_weights(load_quantized_checkpoint(inputs.quant_path, trust_remote_code))
        quantized_row = quantized_pass(quantized, len(batches), device, store, "quantized")
    return VlmEvalReport(str(inputs.dataset), len(batches), max_new_tokens, float_row, quantized_row)
