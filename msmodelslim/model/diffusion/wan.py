"""Wan2.1 and Wan2.2 text-to-video, as the diffusers library builds them: a `WanPipeline` folder (model_index.json
with transformer/, vae/, text_encoder/, tokenizer/, scheduler/). The denoiser is `WanTransformer3DModel`; its blocks
(`blocks.<i>`, `WanTransformerBlock`) are called as block(hidden_states, encoder_hidden_states, temb, rotary_emb),
the arguments the calibration dump captures. The text encoder (UMT5) and the VAE are never quantized.

Wan2.2-TI2V-5B is a single DiT whose pipeline has `expand_timesteps` (one timestep per latent token; text-to-video
sampling gives every token the step's timestep). Wan2.2-T2V-A14B has two denoisers ("experts", the `Expert`s of
its family): diffusers' `transformer` denoises the high-noise steps (t >= boundary_ratio * num_train_timesteps)
and `transformer_2` the low-noise ones. Each is calibrated on the steps at which sampling calls it, and saved
under the Wan repository's folder names (save_path/high_noise_model/, save_path/low_noise_model/).

Everything here reads JSON files only; the weights are loaded by `load_pipeline`, after every check passed.
Nothing runs code from the model folder: the pipeline and component classes must be the diffusers/transformers
classes named below.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from msmodelslim.core.config_errors import validated
from msmodelslim.core.errors import ConfigError, InvalidModelError, UnsupportedError
from msmodelslim.model.diffusion.attention import DitAttentionLayout
from msmodelslim.model.diffusion.smoothing import WAN_SMOOTHING, DitSmoothing

SIZE = re.compile(r"^(\d+)\*(\d+)$")  # "W*H", as the Wan repository's --size
DEFAULT_PROMPT = ("A cat and a dog baking a cake together in a kitchen. The cat is carefully measuring flour, "
                  "while the dog is stirring the batter with a wooden spoon.")


class PromptedSampling(BaseModel):
    """An inference_config's prompt field (one sampling run per prompt; subclasses declare it with their default),
    checked non-empty, and read as a list."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("prompt", check_fields=False)
    @classmethod
    def _prompts_not_empty(cls, value):
        prompts = [value] if isinstance(value, str) else value
        if not prompts or any(not p.strip() for p in prompts):
            raise ValueError("give at least one non-empty prompt")
        return value

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class WanInferenceConfig(PromptedSampling):
    """`multimodal_sd_config.inference_config` for Wan2.1: the sampling the calibration dump runs, under the
    names of the Wan repository's generate.py (--prompt, --size, --frame_num, --sample_steps, ...)."""

    prompt: Union[str, list[str]] = DEFAULT_PROMPT  # one sampling run per prompt
    negative_prompt: str = ""
    size: str = "832*480"  # width*height in pixels
    frame_num: int = Field(81, ge=1, le=1001)
    sample_steps: int = Field(50, ge=1, le=1000)
    sample_guide_scale: float = Field(5.0, ge=0, le=100)  # > 1: classifier-free guidance (two DiT calls a step)
    base_seed: int = Field(42, ge=0, le=2**31 - 1)
    max_sequence_length: int = Field(512, ge=1, le=4096)  # the Wan repository's text_len
    # the Wan repository's --task ("t2v-14B", "t2v-A14B", ...): the family checks it (DiffusionFamily.tasks); it
    # names the per-expert calibration dumps, while the checkpoint decides what runs
    task: Optional[str] = None
    offload_model: bool = False

    @field_validator("size")
    @classmethod
    def _size_format(cls, value: str) -> str:
        if SIZE.match(value) is None:
            raise ValueError(f"size {value!r} must be WIDTH*HEIGHT in pixels, e.g. '832*480'")
        return value

    @field_validator("frame_num")
    @classmethod
    def _frames_of_the_vae(cls, value: int) -> int:
        # The Wan VAE compresses 4 frames into one latent frame after the first: diffusers would round any other
        # count silently, and the dump would then not describe what was asked.
        if (value - 1) % 4:
            raise ValueError(f"frame_num {value} must be 4k+1 (1, 5, 9, ..., 81) for the Wan VAE")
        return value

    @property
    def width_height(self) -> tuple[int, int]:
        match = SIZE.match(self.size)
        return int(match[1]), int(match[2])

    def pipeline_kwargs(self) -> dict[str, Any]:
        """WanPipeline.__call__ arguments for one prompt's sampling (prompt and generator added by the caller)."""
        width, height = self.width_height
        return dict(negative_prompt=self.negative_prompt or None, height=height, width=width,
                    num_frames=self.frame_num, num_inference_steps=self.sample_steps,
                    guidance_scale=self.sample_guide_scale, max_sequence_length=self.max_sequence_length,
                    output_type="latent")


def validated_inference_config(model: type[BaseModel], raw: dict[str, Any], source: str) -> Any:
    """`spec.multimodal_sd_config.inference_config` as the family's sampling model; each problem named by its
    key, an unknown key with the accepted ones."""
    def describe(err: dict) -> str:
        where = ".".join(str(p) for p in err["loc"])
        what = ("unknown key (accepted: " + ", ".join(model.model_fields) + ")"
                if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, "))
        return f"spec.multimodal_sd_config.inference_config.{where}: {what}"

    return validated(model, raw, source, describe)


@dataclass(frozen=True)
class Expert:
    """One denoiser of a pipeline: the pipeline component holding it, and the name its output folder and its
    calibration dump carry ('' for a pipeline with a single DiT, whose folder keeps the component's name)."""

    component: str
    name: str = ""

    @property
    def folder(self) -> str:
        return self.name or self.component


def _has_second_denoiser(index: dict) -> bool:
    entry = index.get("transformer_2")
    return isinstance(entry, list) and bool(entry) and entry[0] is not None


@dataclass(frozen=True)
class DiffusionFamily:
    """A diffusion model family as data: its names, its diffusers pipeline and the denoiser inside it."""

    key: str  # the established tool's adapter key
    names: tuple[str, ...]  # --model_type names
    pipeline_class: str
    # {component folder: (library, accepted class names)}: model_index.json must name exactly these
    components: dict[str, tuple[str, tuple[str, ...]]] = field(default_factory=dict)
    denoiser: str = "transformer"  # the component whose class builds every expert
    experts: tuple[Expert, ...] = (Expert("transformer"),)  # the denoisers that are quantized, in pipeline order
    blocks: str = "blocks"  # the denoiser's ModuleList of DiT blocks
    description: str = "Wan2.1 text-to-video"
    tasks: tuple[str, ...] = ("t2v-14B", "t2v-1.3B")  # inference_config.task values; the first is the default
    other_tasks: str = "image-to-video and Wan2.2 tasks are not supported yet"
    expand_timesteps: bool = False  # model_index.json's expand_timesteps (per-token timesteps: Wan2.2 TI2V-5B)
    # What other pipelines of the same model line mean, for a refusal that names them
    other_pipelines: dict[str, str] = field(default_factory=dict)
    # The attention modules of a block, where online_quarot and fa3_quant reach Q/K/V (None: both are refused)
    attention: Optional[DitAttentionLayout] = None
    # Where iter_smooth / smooth_quant move scales in a block (model/diffusion/smoothing.py; None: both refused)
    smoothing: Optional[DitSmoothing] = None
    sampling_class: type = WanInferenceConfig  # what its inference_config validates as

    def inference_config(self, raw: dict[str, Any], source: str) -> WanInferenceConfig:
        sampling = validated_inference_config(self.sampling_class, raw, source)
        if sampling.task is not None and sampling.task not in self.tasks:
            raise ConfigError(f"{source}: invalid configuration:\n  spec.multimodal_sd_config.inference_config.task: "
                              f"task {sampling.task!r}: this adapter runs {self.description}, "
                              f"{' or '.join(repr(t) for t in self.tasks)} ({self.other_tasks})")
        return sampling

    def task_of(self, sampling: WanInferenceConfig) -> str:
        """The task the per-expert dump files are named after (`calib_data_<task>_<expert>.pth`)."""
        return sampling.task or self.tasks[0]

    def accepts_index(self, index: dict) -> bool:
        """Whether model_index.json describes a pipeline of this family (class, number of denoisers, timesteps)."""
        return (index.get("_class_name") == self.pipeline_class
                and _has_second_denoiser(index) == (len(self.experts) > 1)
                and bool(index.get("expand_timesteps")) == self.expand_timesteps)

    def check_sampling(self, sampling: WanInferenceConfig, model_path: Path) -> None:
        """What the sampling settings need from this checkpoint (config files only)."""
        if sampling.offload_model:
            raise UnsupportedError("inference_config.offload_model: true is not implemented (the pipeline stays on "
                                   "the --device while it samples); remove it")
        vae = _read_json(model_path / "vae" / "config.json")
        transformer = _read_json(model_path / self.denoiser / "config.json")
        spatial = int(vae.get("scale_factor_spatial", 8))  # what WanPipeline divides the size by (8 for Wan2.1)
        patch = transformer.get("patch_size", [1, 2, 2])
        width, height = sampling.width_height
        step_h, step_w = spatial * patch[1], spatial * patch[2]
        if height % step_h or width % step_w:
            raise ConfigError(f"inference_config.size {sampling.size!r}: width must be a multiple of {step_w} and "
                              f"height of {step_h} for this checkpoint (VAE factor {spatial} x patch {patch[1:]})")

    def check_folder(self, model_path: Path, saved: bool = False) -> dict:
        """model_index.json of a pipeline this family runs, read and checked; refusals name what is missing.
        `saved`: a folder the service wrote, whose experts are in their expert folders (Expert.folder)."""
        folder_of = {e.component: e.folder for e in self.experts} if saved else {}
        index_file = model_path / "model_index.json"
        if not index_file.is_file():
            folders = ", ".join(f"{c}/" for c in self.components)
            raise InvalidModelError(f"--model_path {model_path} is not a diffusers pipeline folder: model_index.json "
                                    f"is missing (a {self.names[-1]} model is the folder a {self.pipeline_class} was "
                                    f"saved to, with {folders})")
        index = _read_json(index_file)
        cls = index.get("_class_name")
        if cls != self.pipeline_class:
            meaning = self.other_pipelines.get(cls)
            if meaning is not None:
                raise UnsupportedError(f"{model_path} is a {cls} ({meaning}), which is not supported yet (it "
                                       f"belongs to the diffusion transformer work); --model_type "
                                       f"{self.names[-1]} runs {self.pipeline_class}")
            raise InvalidModelError(f"{model_path}: model_index.json names pipeline {cls!r}; --model_type "
                                    f"{self.names[-1]} needs a diffusers {self.pipeline_class}")
        self.check_variant(model_path, index)
        for component, (library, classes) in self.components.items():
            entry = index.get(component)
            if not (isinstance(entry, list) and len(entry) == 2 and entry[0] == library and entry[1] in classes):
                raise InvalidModelError(f"{model_path}: model_index.json gives {component} as {entry!r}; a "
                                        f"{self.pipeline_class} of {self.names[-1]} has [{library!r}, one of "
                                        f"{', '.join(classes)}] (nothing from the model folder is run as code)")
            folder = folder_of.get(component, component)
            if not (model_path / folder).is_dir():
                raise InvalidModelError(f"{model_path}: the {folder}/ folder named by model_index.json is missing")
        self.check_denoisers(model_path, [folder_of.get(e.component, e.component) for e in self.experts])
        return index

    def check_variant(self, model_path: Path, index: dict) -> None:
        """What tells the Wan pipelines of one class apart (one or two denoisers, expand_timesteps)."""
        two = len(self.experts) > 1
        if _has_second_denoiser(index) and not two:
            raise UnsupportedError(f"{model_path} has two denoisers (transformer and transformer_2: Wan2.2's high- "
                                   f"and low-noise experts); --model_type {self.names[-1]} runs a pipeline with one. "
                                   f"Use --model_type Wan2.2-T2V-A14B")
        if two and not _has_second_denoiser(index):
            raise InvalidModelError(f"{model_path}: model_index.json names one denoiser; --model_type "
                                    f"{self.names[-1]} needs two (transformer and transformer_2, the high- and "
                                    f"low-noise experts) and boundary_ratio. A single-DiT WanPipeline is Wan2.1")
        if two:
            boundary = index.get("boundary_ratio")
            if not (isinstance(boundary, (int, float)) and not isinstance(boundary, bool) and 0 < boundary < 1):
                raise InvalidModelError(f"{model_path}: model_index.json gives boundary_ratio {boundary!r}; two "
                                        f"experts need a number in (0, 1) (the fraction of the timesteps at which "
                                        f"sampling switches from transformer to transformer_2, 0.875 for T2V-A14B)")
        if bool(index.get("expand_timesteps")) != self.expand_timesteps:
            if self.expand_timesteps:
                raise InvalidModelError(f"{model_path}: model_index.json has no expand_timesteps; --model_type "
                                        f"{self.names[-1]} needs it (per-token timesteps of Wan2.2 TI2V-5B). A "
                                        f"single-DiT WanPipeline without it is Wan2.1")
            raise UnsupportedError(f"{model_path} samples with expand_timesteps (Wan2.2 TI2V-5B); --model_type "
                                   f"{self.names[-1]} runs a pipeline without it. Use --model_type Wan2.2-TI2V-5B")

    def check_denoisers(self, model_path: Path, folders: list[str]) -> None:
        """Each denoiser's config: Wan2.1's image-to-video DiTs (CLIP image embeddings) are not supported."""
        for folder in folders:
            config = _read_json(model_path / folder / "config.json")
            if config.get("image_dim") is not None or config.get("added_kv_proj_dim") is not None:
                raise UnsupportedError(f"{model_path}/{folder} takes image embeddings (image-to-video), which is "
                                       f"not supported yet (it belongs to the diffusion transformer work)")

    def load_pipeline(self, model_path: Path, device: torch.device):
        """The float pipeline from the local folder (no download, no remote code), in the DiT's stored dtype."""
        import diffusers

        pipeline_cls = getattr(diffusers, self.pipeline_class)
        dtype = stored_dtype(model_path / self.denoiser)
        try:
            pipe = pipeline_cls.from_pretrained(str(model_path), local_files_only=True, **dtype_kwargs(dtype))
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise InvalidModelError(f"{model_path}: diffusers could not load the {self.pipeline_class}: "
                                    f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}") from None
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device)

    def denoiser_of(self, pipe) -> nn.Module:
        return getattr(pipe, self.denoiser)

    def denoisers_of(self, pipe) -> dict[str, nn.Module]:
        """{expert folder: its denoiser} of a loaded pipeline."""
        return {e.folder: getattr(pipe, e.component) for e in self.experts}

    def block_list(self, denoiser: nn.Module) -> nn.ModuleList:
        return getattr(denoiser, self.blocks)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidModelError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidModelError(f"{path} is not a readable JSON file: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidModelError(f"{path} must hold a JSON object")
    return data


def dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """from_pretrained's dtype argument: `dtype` where diffusers has it (it deprecated `torch_dtype`), else
    `torch_dtype`."""
    from diffusers.utils import deprecation_utils

    return {"dtype": dtype} if hasattr(deprecation_utils, "_resolve_dtype") else {"torch_dtype": dtype}


SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def stored_dtype(folder: Path) -> torch.dtype:
    """The dtype of the first floating-point tensor in the folder's safetensors (headers only)."""
    from safetensors import safe_open

    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                dtype = SAFETENSORS_DTYPES.get(f.get_slice(key).get_dtype())
                if dtype is not None:
                    return dtype
    raise InvalidModelError(f"{folder} holds no floating-point safetensors weights")


# Each WanTransformerBlock: attn1 (self-attention over the video tokens, with RoPE) and attn2 (cross-attention
# over the text); both are WanAttention run by WanAttnProcessor.
# The Wan repository (and the established tool's recipes) call them self_attn and cross_attn.
WAN_ATTENTION = DitAttentionLayout(modules=("attn1", "attn2"),
                                   upstream_names={"attn1": "self_attn", "attn2": "cross_attn"})

WAN2_1 = DiffusionFamily(
    key="wan2_1",
    names=("Wan2_1", "Wan2.1"),
    pipeline_class="WanPipeline",
    components={
        "transformer": ("diffusers", ("WanTransformer3DModel",)),
        "vae": ("diffusers", ("AutoencoderKLWan",)),
        "text_encoder": ("transformers", ("UMT5EncoderModel", "T5EncoderModel")),
        "tokenizer": ("transformers", ("T5Tokenizer", "T5TokenizerFast", "AutoTokenizer", "PreTrainedTokenizerFast",
                                       "TokenizersBackend")),
        "scheduler": ("diffusers", ("FlowMatchEulerDiscreteScheduler", "UniPCMultistepScheduler")),
    },
    other_pipelines={"WanImageToVideoPipeline": "Wan2.1 image-to-video", "WanVACEPipeline": "Wan2.1 VACE",
                     "WanVideoToVideoPipeline": "Wan2.1 video-to-video", "WanAnimatePipeline": "Wan2.2 Animate"},
    attention=WAN_ATTENTION,
    smoothing=WAN_SMOOTHING,
)


WAN2_2_T2V = DiffusionFamily(
    key="wan2_2_t2v",
    names=("Wan2.2-T2V-A14B",),
    pipeline_class="WanPipeline",
    components={**WAN2_1.components, "transformer_2": ("diffusers", ("WanTransformer3DModel",))},
    # diffusers' transformer runs t >= boundary (the Wan repository's high_noise_model), transformer_2 the rest
    experts=(Expert("transformer", "high_noise_model"), Expert("transformer_2", "low_noise_model")),
    description="Wan2.2 text-to-video with two experts",
    tasks=("t2v-A14B",),
    other_tasks="Wan2.2 image-to-video (i2v-A14B) is --model_type Wan2.2-I2V-A14B; text-image-to-video (ti2v-5B) "
                "is --model_type Wan2.2-TI2V-5B",
    # a WanImageToVideoPipeline with two experts is Wan2.2-I2V-A14B (wan_i2v.py): the generic refusal names it
    other_pipelines={k: v for k, v in WAN2_1.other_pipelines.items() if k != "WanImageToVideoPipeline"},
    attention=WAN_ATTENTION,
    smoothing=WAN_SMOOTHING,
)

WAN2_2_TI2V = DiffusionFamily(
    key="wan2_2_ti2v",
    names=("Wan2.2-TI2V-5B",),
    pipeline_class="WanPipeline",
    components=WAN2_1.components,
    description="Wan2.2 TI2V-5B text-to-video",
    tasks=("ti2v-5B",),
    other_tasks="image conditioning and the A14B tasks are not supported by this family",
    expand_timesteps=True,
    other_pipelines=WAN2_2_T2V.other_pipelines,
    attention=WAN_ATTENTION,
    smoothing=WAN_SMOOTHING,
)
