"""Diffusion families described on diffusers' own pipeline arguments (FLUX.1, Qwen-Image-Edit, HunyuanVideo):
`DiTFamily` is a `DiffusionFamily` (wan.py) whose denoiser may hold several lists of blocks, walked one block at
a time in the order the denoiser calls them (FLUX.1 and HunyuanVideo: the dual-stream `transformer_blocks`, then
the single-stream `single_transformer_blocks`).

Every block of these DiTs carries two streams, the image (or video) tokens and the text tokens, and returns both;
the family says in which order (`encoder_first`: FLUX.1 and Qwen-Image return (encoder_hidden_states,
hidden_states), HunyuanVideo returns (hidden_states, encoder_hidden_states)). A block's inputs are its positional
arguments (hidden_states, encoder_hidden_states, the rest: timestep embedding, rotary embedding, masks), so the next
block's inputs are this block's two outputs followed by the same other arguments. That is the whole contract the
layer-wise walk (app/diffusion_output.py) and the calibration dump (core/sd_calibration.py) rely on.

The `inference_config` of these families uses diffusers' pipeline argument names (num_inference_steps, height,
width, guidance_scale, ...): protocol.md names no keys for them. Only `seed` is ours (diffusers takes a generator).
Like wan.py, nothing here reads a weight; the helpers at the end give the Wan families (one list of blocks, one
stream) the same interface.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Union

import torch
from pydantic import Field
from torch import nn

from msmodelslim.core.errors import ConfigError, InvalidModelError
from msmodelslim.model.diffusion.wan import (DiffusionFamily, PromptedSampling, _read_json, dtype_kwargs,
                                            stored_dtype, validated_inference_config)
from msmodelslim.model.interface import block_hidden_state, ends_with_parts

TOKENIZERS = ("CLIPTokenizer", "CLIPTokenizerFast", "T5Tokenizer", "T5TokenizerFast", "LlamaTokenizer",
              "LlamaTokenizerFast", "Qwen2Tokenizer", "Qwen2TokenizerFast", "AutoTokenizer",
              "PreTrainedTokenizerFast", "TokenizersBackend")  # TokenizersBackend: transformers 5's fast tokenizer
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)


class DiTInferenceConfig(PromptedSampling):
    """What every family's inference_config has: the prompts (one sampling run each), the number of denoising
    steps and the seed of the first run (run i uses seed + i)."""

    prompt: Union[str, list[str]]
    num_inference_steps: int = Field(28, ge=1, le=1000)
    seed: int = Field(42, ge=0, le=2**31 - 1)

    # the names app/diffusion.py and app/diffusion_eval.py read (WanInferenceConfig's)
    @property
    def sample_steps(self) -> int:
        return self.num_inference_steps

    @property
    def base_seed(self) -> int:
        return self.seed

    def pipeline_kwargs(self) -> dict[str, Any]:
        """The pipeline's __call__ arguments for one prompt's sampling (prompt and generator added by the caller);
        latents out, the VAE never decodes."""
        raise NotImplementedError

    def check(self, model_path: Path, family: "DiTFamily") -> None:
        """What these settings need from the checkpoint (config files only)."""


def refuse_off_grid_size(height: int, width: int, multiple: int, why: str) -> None:
    if height % multiple or width % multiple:
        raise ConfigError(f"inference_config height {height} and width {width} must be multiples of {multiple} "
                          f"for this checkpoint ({why}); the pipeline would resize silently and the calibration "
                          f"would not describe what was asked")


@dataclass(frozen=True)
class DiTFamily(DiffusionFamily):
    """A diffusion family as data, on diffusers' pipeline arguments: its blocks may come in several lists."""

    block_lists: tuple[str, ...] = ("transformer_blocks",)  # the denoiser's ModuleLists, in call order
    encoder_first: bool = True  # a block returns (encoder_hidden_states, hidden_states); False: the reverse
    row_parallel: tuple[str, ...] = ()  # linear name suffixes whose input is split in tensor parallelism
    sampling_class: type[DiTInferenceConfig] = DiTInferenceConfig
    # {component: build(its folder)} for components diffusers cannot load whole here (Qwen-Image-Edit's processor
    # without torchvision); passed to from_pretrained in their place
    component_builders: dict[str, Callable[[Path], Any]] = field(default_factory=dict)

    def inference_config(self, raw: dict[str, Any], source: str) -> DiTInferenceConfig:
        return validated_inference_config(self.sampling_class, raw, source)

    def task_of(self, sampling: DiTInferenceConfig) -> str:
        """Names the per-expert dump files; a single DiT's dump is calib_data.pth whatever it is."""
        return self.key

    def accepts_index(self, index: dict) -> bool:
        return index.get("_class_name") == self.pipeline_class

    def check_sampling(self, sampling: DiTInferenceConfig, model_path: Path) -> None:
        sampling.check(model_path, self)

    def check_variant(self, model_path: Path, index: dict) -> None:
        """One pipeline class, one denoiser: nothing tells variants apart (model_index.json's class and components
        are checked by check_folder)."""

    def check_denoisers(self, model_path: Path, folders: list[str]) -> None:
        """The denoiser's class is checked from model_index.json; its config holds nothing this version refuses."""

    def load_pipeline(self, model_path: Path, device: torch.device):
        """The float pipeline from the local folder (no download, no remote code), in the DiT's stored dtype."""
        import diffusers

        pipeline_cls = getattr(diffusers, self.pipeline_class)
        dtype = stored_dtype(model_path / self.denoiser)
        try:
            pipe = pipeline_cls.from_pretrained(str(model_path), local_files_only=True, **dtype_kwargs(dtype),
                                                **prebuilt_components(self, model_path))
        except (OSError, ValueError, KeyError, RuntimeError, ImportError) as exc:
            raise InvalidModelError(f"{model_path}: diffusers could not load the {self.pipeline_class}: "
                                    f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}") from None
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device)

    def walk(self, denoiser: nn.Module) -> list[tuple[str, nn.Module]]:
        """[(qualified name, block)] in the order the denoiser calls them."""
        return [(f"{name}.{i}", block) for name in self.block_lists for i, block in enumerate(getattr(denoiser, name))]

    def next_inputs(self, args: tuple, output: Any) -> tuple:
        """The next block's positional arguments: this block's two streams, then the same other arguments."""
        encoder, hidden = output if self.encoder_first else output[::-1]
        return (hidden, encoder, *args[2:])


def config_of(model_path: Path, component: str) -> dict:
    return _read_json(model_path / component / "config.json")


# ---- one interface over DiTFamily and the Wan families (one list of blocks, hidden states alone) ---------------
def block_list_names(family: DiffusionFamily) -> tuple[str, ...]:
    return family.block_lists if isinstance(family, DiTFamily) else (family.blocks,)


def block_walk(family: DiffusionFamily, denoiser: nn.Module) -> list[tuple[str, nn.Module]]:
    if isinstance(family, DiTFamily):
        return family.walk(denoiser)
    return [(f"{family.blocks}.{i}", block) for i, block in enumerate(family.block_list(denoiser))]


def next_block_inputs(family: DiffusionFamily, args: tuple, output: Any) -> tuple:
    if isinstance(family, DiTFamily):
        return family.next_inputs(args, output)
    return (block_hidden_state(output), *args[1:])


def is_row_parallel(family: DiffusionFamily, name: str) -> bool:
    suffixes = family.row_parallel if isinstance(family, DiTFamily) else ("to_out.0", "ffn.net.2")
    return ends_with_parts(name, suffixes)


def prebuilt_components(family: DiffusionFamily, model_path: Path) -> dict[str, Any]:
    """The components the family builds itself, to pass to the pipeline's from_pretrained."""
    if not isinstance(family, DiTFamily):
        return {}
    return {name: build(model_path / name) for name, build in family.component_builders.items()}


def steps_key(family: DiffusionFamily) -> str:
    """The inference_config key of the number of sampling steps."""
    return "num_inference_steps" if isinstance(family, DiTFamily) else "sample_steps"
