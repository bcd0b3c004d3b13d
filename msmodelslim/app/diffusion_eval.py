"""Use case: how far a quantized diffusion pipeline (app/diffusion.py's output) is from its float pipeline.

Two measures, on held-out prompts (not the calibration ones) and a short sampling schedule whose timesteps are
not the calibration schedule's:
- the denoiser: the float pipeline samples; every call of its DiT is recorded (inputs and output), and the
  quantized DiT is run on the same inputs. Per call: relative error ||q - f|| / ||f|| and cosine similarity of
  the flattened outputs (the velocity/noise prediction the scheduler integrates). With several experts
  (Wan2.2-T2V-A14B) each call is compared with the quantized copy of the expert the pipeline called, and the
  errors are also reported per expert.
- the sampler: the quantized pipeline samples from the same seed; the final latents are compared with the
  float pipeline's by PSNR = 10 log10(R^2 / MSE), R the float latents' range (max - min). Errors of each step
  feed the next, so this is the end-to-end number.

The text encoder and VAE are shared between the two pipelines (quantization leaves them unchanged), so the
comparison isolates the DiT. `msmodelslim eval --model_path FLOAT --quant_path QUANT --dataset prompts.txt`
runs it when QUANT is a pipeline folder; `python -m msmodelslim.app.diffusion_eval` too.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import yaml
from torch import nn

from msmodelslim.core.errors import ConfigError
from msmodelslim.core.logging import get_logger
from msmodelslim.format.ascendv1.diffusion import load_quantized_pipeline
from msmodelslim.model.diffusion.dit import steps_key
from msmodelslim.model.diffusion.wan import DiffusionFamily, WanInferenceConfig

log = get_logger("app.diffusion_eval")

HELD_OUT_PROMPTS = ("A red kite flies above a windy beach at sunset.",
                    "An old train crosses a snowy mountain bridge, seen from far away.")


@dataclass
class DiffusionEvalReport:
    rel_errors: list[float] = field(default_factory=list)  # one per denoiser call
    rel_errors_by_expert: dict[str, list[float]] = field(default_factory=dict)  # {expert folder: its calls'}
    cosines: list[float] = field(default_factory=list)
    latent_psnr_db: list[float] = field(default_factory=list)  # one per prompt
    steps: int = 0
    prompts: int = 0

    @property
    def rel_error_mean(self) -> float:
        return sum(self.rel_errors) / len(self.rel_errors)

    @property
    def psnr_mean(self) -> float:
        return sum(self.latent_psnr_db) / len(self.latent_psnr_db)

    def table(self) -> str:
        """Float (the reference: exact by definition) against the quantized pipeline."""
        rows = [("denoiser relative error, mean", "0", f"{self.rel_error_mean:.4g}"),
                ("denoiser relative error, max", "0", f"{max(self.rel_errors):.4g}"),
                ("denoiser cosine similarity, min", "1", f"{min(self.cosines):.6f}")]
        if len(self.rel_errors_by_expert) > 1:
            rows += [(f"denoiser relative error, mean ({name}, {len(errors)} calls)", "0",
                      f"{sum(errors) / len(errors):.4g}" if errors else "-")
                     for name, errors in self.rel_errors_by_expert.items()]
        rows += [(f"final-latent PSNR after {self.steps} steps (dB), mean", "inf", f"{self.psnr_mean:.2f}"),
                 (f"final-latent PSNR after {self.steps} steps (dB), min", "inf", f"{min(self.latent_psnr_db):.2f}")]
        width = max(len(r[0]) for r in rows)
        lines = [f"{'metric'.ljust(width)}  {'float':>8}  {'quantized':>10}",
                 f"{'-' * width}  {'-' * 8}  {'-' * 10}"]
        lines += [f"{name.ljust(width)}  {a:>8}  {b:>10}" for name, a, b in rows]
        lines.append(f"({self.prompts} held-out prompt(s), {len(self.rel_errors)} denoiser calls)")
        return "\n".join(lines)


def relative_error(quantized: torch.Tensor, reference: torch.Tensor) -> float:
    q, f = quantized.double().flatten(), reference.double().flatten()
    return float((q - f).norm() / f.norm().clamp_min(1e-30))


def cosine(quantized: torch.Tensor, reference: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(quantized.double().flatten(), reference.double().flatten(),
                                                       dim=0))


def psnr_db(test: torch.Tensor, reference: torch.Tensor) -> float:
    """10 log10(R^2 / MSE), R = max - min of the reference; inf when equal."""
    reference, test = reference.double(), test.double()
    mse = float(((test - reference) ** 2).mean())
    peak = float(reference.max() - reference.min())
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output.sample


def final_latents(output: Any) -> torch.Tensor:
    """The latents a pipeline returns with output_type="latent": `.frames` of a video pipeline, `.images` of an
    image pipeline (FLUX.1, Qwen-Image-Edit)."""
    return output.frames if hasattr(output, "frames") else output.images


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, tuple):
        return tuple(_clone(v) for v in value)
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


@torch.no_grad()
def _record_denoiser_calls(pipe, denoisers: dict[str, nn.Module], prompt: str, seed: int,
                           kwargs: dict) -> tuple[list, torch.Tensor]:
    """[(expert, args, kwargs, output)] for every DiT call of one float sampling run, and its final latents."""
    calls: list = []

    def recorder(name: str):
        def hook(_module, args, call_kwargs, output):
            calls.append((name, _clone(args), _clone(call_kwargs), _first(output).detach().clone()))
        return hook

    handles = [d.register_forward_hook(recorder(name), with_kwargs=True) for name, d in denoisers.items()]
    try:
        latents = final_latents(pipe(prompt=prompt, generator=torch.Generator("cpu").manual_seed(seed), **kwargs))
    finally:
        for handle in handles:
            handle.remove()
    return calls, latents


@torch.no_grad()
def compare_pipelines(float_pipe, quant_pipe, family: DiffusionFamily, sampling: WanInferenceConfig,
                      prompts: Sequence[str]) -> DiffusionEvalReport:
    """The two measures of the module docstring on already loaded pipelines."""
    kwargs = sampling.pipeline_kwargs()
    float_denoisers, quant_denoisers = family.denoisers_of(float_pipe), family.denoisers_of(quant_pipe)
    report = DiffusionEvalReport(steps=sampling.sample_steps, prompts=len(prompts),
                                 rel_errors_by_expert={name: [] for name in float_denoisers})
    for i, prompt in enumerate(prompts):
        seed = sampling.base_seed + i
        calls, float_latents = _record_denoiser_calls(float_pipe, float_denoisers, prompt, seed, kwargs)
        for expert, args, call_kwargs, reference in calls:
            out = _first(quant_denoisers[expert](*args, **call_kwargs))
            report.rel_errors.append(relative_error(out, reference))
            report.rel_errors_by_expert[expert].append(report.rel_errors[-1])
            report.cosines.append(cosine(out, reference))
        quant_latents = final_latents(quant_pipe(prompt=prompt, generator=torch.Generator("cpu").manual_seed(seed),
                                                 **kwargs))
        report.latent_psnr_db.append(psnr_db(quant_latents, float_latents))
    return report


def saved_sampling(quant_path: Path, family: DiffusionFamily, steps: Optional[int]) -> WanInferenceConfig:
    """The sampling settings the checkpoint was calibrated with (its saved practice), with `steps` steps."""
    practice = quant_path / f"{family.key}_best_practice.yaml"
    raw: dict = {}
    if practice.is_file():
        spec = (yaml.safe_load(practice.read_text(encoding="utf-8")) or {}).get("spec", {})
        sd = spec.get("multimodal_sd_config") or {}
        raw = dict(sd.get("inference_config") or sd.get("model_config") or {})
    raw.pop("prompt", None)
    if steps is not None:
        raw[steps_key(family)] = steps
    return family.inference_config(raw, str(practice))


def evaluate_diffusion(float_path: str | Path, quant_path: str | Path, model_type: str = "Wan2.1",
                       prompts: Sequence[str] = HELD_OUT_PROMPTS, steps: Optional[int] = 4,
                       device: torch.device = torch.device("cpu")) -> DiffusionEvalReport:
    from msmodelslim.app.diffusion_family import family_for

    float_path, quant_path = Path(float_path).expanduser().resolve(), Path(quant_path).expanduser().resolve()
    family = family_for(model_type, float_path)
    if not prompts:
        raise ConfigError("give at least one held-out prompt")
    family.check_folder(float_path)
    sampling = saved_sampling(quant_path, family, steps)
    float_pipe = family.load_pipeline(float_path, device)
    quant_pipe = load_quantized_pipeline(quant_path, family, device, components=float_pipe.components)
    return compare_pipelines(float_pipe, quant_pipe, family, sampling, list(prompts))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m msmodelslim.app.diffusion_eval",
                                     description="float vs quantized diffusion pipeline: denoiser error, latent PSNR")
    parser.add_argument("--model_path", required=True, type=Path, help="the float diffusers pipeline folder")
    parser.add_argument("--quant_path", required=True, type=Path, help="the folder msmodelslim quant wrote")
    parser.add_argument("--model_type", default="Wan2.1")
    parser.add_argument("--prompt", action="append", default=None, help="held-out prompt (repeatable)")
    parser.add_argument("--steps", type=int, default=4, help="sampling steps (default 4)")
    args = parser.parse_args(argv)
    report = evaluate_diffusion(args.model_path, args.quant_path, args.model_type,
                                tuple(args.prompt or HELD_OUT_PROMPTS), args.steps)
    print(report.table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def run_diffusion_eval_cli(args) -> int:
    """`msmodelslim eval` on a quantized diffusion pipeline: --dataset holds the held-out prompts (one text per
    entry, as for perplexity), --max_windows caps how many are sampled."""
    from msmodelslim.model.diffusion import family_of_folder, supported_names
    from msmodelslim.core.dataset import load_texts
    from msmodelslim.core.device import parse_device

    family = family_of_folder(args.quant_path)
    if family is None:
        raise ConfigError(f"--quant_path {args.quant_path}: model_index.json names no pipeline this version "
                          f"evaluates (supported: {supported_names()})")
    prompts = [t.strip() for t in load_texts(args.dataset) if t.strip()][: max(args.max_windows, 1)]
    report = evaluate_diffusion(args.model_path, args.quant_path, family.names[-1], prompts,
                                device=parse_device(args.device).primary)
    print(report.table())
    return 0
