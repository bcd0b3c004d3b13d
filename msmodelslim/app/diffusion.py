"""Use case: quantize the denoiser (DiT) of a diffusers pipeline with `apiversion: multimodal_sd_modelslim_v1`.

Order of work, cheapest checks first (nothing is loaded before all of them passed): the model type names a
diffusion family, the config parses, its inference_config is valid for the family, the pipeline folder is
one the family runs (model_index.json and config files), the save path is usable, an existing calibration dump
belongs to this model and sampling. Then, unless that dump exists, the float pipeline is loaded and samples
while the DiT's first-block inputs are captured (core/sd_calibration.py), and is released. The DiT is then
read from its checkpoint one block at a time onto a skeleton built on the meta device (model/diffusion/weights.py):
each block is processed (`core/runner.process_block`, the same per-block schedule as the text pipeline), written
and released before the next one is read.

Output (written into a staging directory and moved into place when complete, format/staging.py):

    save_path/
      model_index.json, scheduler/, text_encoder/, tokenizer/, vae/   copied unchanged
      transformer/   config.json + quant_model_description.json + quant_model_weights*.safetensors (ascendv1),
                     or quant_model_description_<type>.json + quant_model_weight_<type>*.safetensors (mindie)
      calib_data.pth                                                   when dump_data_dir is "" (the default)
      wan2_1_best_practice.yaml                                         the config that was run

A pipeline with several denoisers (Wan2.2-T2V-A14B: transformer and transformer_2, the high- and low-noise
experts) is sampled once; each expert is calibrated on the steps at which the pipeline called it, and each is
quantized and written in turn, one block at a time, into its expert folder (protocol.md 2.8):

    save_path/
      high_noise_model/, low_noise_model/          the two quantized DiTs, each as transformer/ above
      calib_data_<task>_high_noise_model.pth, calib_data_<task>_low_noise_model.pth
      model_index.json, scheduler/, text_encoder/, tokenizer/, vae/, wan2_2_t2v_best_practice.yaml

Which family a --model_type names: app/diffusion_family.py; its process steps and plan: app/diffusion_processors.py; the
layer-wise quantization and the output folder: app/diffusion_output.py.
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import yaml
from torch import nn

from msmodelslim.app.diffusion_family import WAN2_2_LINE, family_for, is_diffusion_model_type, wan2_2_family
from msmodelslim.app.diffusion_output import copy_other_components, quantize_and_write_expert
from msmodelslim.app.diffusion_processors import build_dit_processors, check_dit_processors, plan_linears
from msmodelslim.app.practice import require_one_practice_source
from msmodelslim.core.config import load_config
from msmodelslim.core.device import DeviceSpec
from msmodelslim.core.errors import ConfigError, InvalidModelError, UnsupportedError
from msmodelslim.core.logging import get_logger
from msmodelslim.core.memory import bound_heap_growth
from msmodelslim.core.sd_calibration import CalibrationDump, capture_block_inputs, dump_name, fingerprint, read_dump
from msmodelslim.core.sd_config import API_VERSION, SdPracticeConfig
from msmodelslim.core.sd_dataset import dataset_sampling, load_sd_dataset
from msmodelslim.format.mindie import refuse_unsupported_schemes
from msmodelslim.format.staging import check_save_path, staged_directory
from msmodelslim.model.diffusion import supported_names
from msmodelslim.model.diffusion.wan import DiffusionFamily, Expert, WanInferenceConfig
from msmodelslim.processor.base import quant_rules

log = get_logger("app.diffusion")

PRACTICES = Path(__file__).resolve().parent.parent / "model" / "diffusion"  # <key>_<quant_type>.yaml


@dataclass
class DiffusionQuantizeRequest:
    model_path: Path
    save_path: Path
    model_type: str
    device: DeviceSpec = field(default_factory=lambda: DeviceSpec("cpu"))
    config_path: Optional[Path] = None
    quant_type: Optional[str] = None  # the family's built-in recipe, e.g. w8a8 -> wan2_1_w8a8_dynamic.yaml
    config: Optional[SdPracticeConfig] = None  # a parsed config instead of a path (the Python API)
    overwrite: bool = False
    dry_run: bool = False


@dataclass
class DiffusionQuantizeReport:
    save_path: Path
    plan: dict[str, str]  # {linear: rule} for every DiT linear a step quantizes ("<expert>/<linear>" for experts)
    sampled: bool = False  # whether the float pipeline sampled (False: the dumps were reused, or none needed)
    denoiser_calls: int = 0  # calibration samples (first-block calls) used, all experts together
    description: dict = field(default_factory=dict)  # the first expert's (the only one for a single DiT)
    descriptions: dict[str, dict] = field(default_factory=dict)  # {expert folder: its description}
    calls_by_expert: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def load_sd_practice(request: DiffusionQuantizeRequest, family: DiffusionFamily) -> SdPracticeConfig:
    require_one_practice_source(request.config_path, request.quant_type, request.config)
    if request.config is not None:
        return request.config
    if request.quant_type is not None:
        path = PRACTICES / f"{family.key}_{request.quant_type.lower()}.yaml"
        dynamic = PRACTICES / f"{family.key}_{request.quant_type.lower()}_dynamic.yaml"
        path = path if path.is_file() else dynamic
        if not path.is_file():
            known = sorted(p.stem.removeprefix(family.key + "_") for p in PRACTICES.glob(f"{family.key}_*.yaml"))
            raise UnsupportedError(f"--quant_type {request.quant_type!r} has no practice for {family.names[-1]} "
                                   f"(available: {', '.join(known)}); write a config and pass --config_path")
        config = load_config(path)
    else:
        config = load_config(request.config_path)
    if not isinstance(config, SdPracticeConfig):
        raise ConfigError(f"{request.config_path}: --model_type {request.model_type} is a diffusion pipeline; its "
                          f"config needs apiversion: {API_VERSION}")
    return config


def _meta_denoiser(family: DiffusionFamily, model_path: Path, expert: Optional[Expert] = None) -> nn.Module:
    """The DiT (of `expert`, by default the first) built from its config.json with no weight read."""
    import diffusers
    from accelerate import init_empty_weights

    component = (expert or family.experts[0]).component
    cls = getattr(diffusers, family.components[family.denoiser][1][0])
    with init_empty_weights():
        return cls.from_config(cls.load_config(str(model_path / component)))


def _dump_locations(config: SdPracticeConfig, save_path: Path, family: DiffusionFamily,
                    task: str) -> tuple[dict[str, Path], bool]:
    """({expert folder: its dump file}, whether they live in the output), per dump_config.dump_data_dir
    ('' = save_path)."""
    folder = config.spec.multimodal_sd_config.dump_config.dump_data_dir
    root = Path(folder or save_path).expanduser().resolve()
    return {e.folder: root / dump_name(task, e.name) for e in family.experts}, not folder


def quantize_diffusion(request: DiffusionQuantizeRequest) -> DiffusionQuantizeReport:
    started = time.perf_counter()
    family = family_for(request.model_type, request.model_path)
    config = load_sd_practice(request, family)
    sd = config.spec.multimodal_sd_config
    source = str(request.config_path or request.quant_type or "<config>")
    raw_sampling = sd.sampling
    if config.spec.dataset is not None:  # the prompt set's texts (and image) are the calibration inputs
        sampling_class = getattr(family, "sampling_model", None) or family.sampling_class  # DiTFamily: sampling_model
        takes_image = "image" in sampling_class.model_fields
        given = dataset_sampling(load_sd_dataset(config.spec.dataset, config.source_dir), takes_image,
                                 f"spec.dataset {config.spec.dataset!r}")
        if "image" in given and raw_sampling.get("image") not in (None, given["image"]):
            raise ConfigError(f"{source}: spec.dataset's entries and inference_config.image name different "
                              f"conditioning images ({given['image']}, {raw_sampling['image']}); keep one")
        raw_sampling = {**raw_sampling, **given}
    sampling = family.inference_config(raw_sampling, source)
    model_path = Path(request.model_path).expanduser().resolve()
    if not model_path.is_dir():
        raise InvalidModelError(f"--model_path {model_path} is not a directory")
    family.check_folder(model_path)
    family.check_sampling(sampling, model_path)
    check_save_path(request.save_path, request.overwrite, model_path, dry_run=request.dry_run)
    if config.spec.save[0].type == "mindie_format_saver":
        refuse_unsupported_schemes(quant_rules(config.spec.process))
    processors = build_dit_processors(config.spec.process, family)
    # config.json only; each block is read when it is processed
    skeletons = {e.folder: _meta_denoiser(family, model_path, e) for e in family.experts}
    plan: dict[str, str] = {}
    for expert in family.experts:
        prefix = f"{expert.name}/" if expert.name else ""
        plan.update({prefix + k: v for k, v in plan_linears(skeletons[expert.folder], family, processors).items()})
        check_dit_processors(skeletons[expert.folder], family, processors)
    if not plan:
        others = sorted({step.type for step in config.spec.process} - {"linear_quant"})
        log.warning("no DiT linear is quantized by spec.process: the output's DiT linears stay float%s",
                    f" (as {', '.join(others)} leaves them)" if others else "")
    needs_data = any(p.needs_calibration for p in processors)
    dump_files, dump_in_output = _dump_locations(config, request.save_path, family, family.task_of(sampling))
    expected = {e.folder: fingerprint(model_path, sampling.model_dump(), sd.dump_config.capture_mode, e.name)
                for e in family.experts}
    dumps: dict[str, CalibrationDump] = {name: read_dump(file, expected[name])
                                         for name, file in dump_files.items() if file.is_file()}
    report = DiffusionQuantizeReport(request.save_path, plan)
    if request.dry_run:
        return report
    bound_heap_growth()  # freed block weights go back to the system (core/memory.py), not into glibc's heap
    missing = [name for name in dump_files if name not in dumps]
    if missing and (sd.dump_config.enable_dump or needs_data):
        # the whole float pipeline is resident only while it samples; quantization then reads block by block
        pipe = family.load_pipeline(model_path, request.device.primary)
        captured = _sample(pipe, family, sampling, expected)
        del pipe
        gc.collect()
        report.sampled = True
        for name in missing:  # a dump already there was checked against the same fingerprint: it is kept
            dumps[name] = captured[name]
            if sd.dump_config.enable_dump and not dump_in_output:  # kept even if the run fails later
                dumps[name].save(dump_files[name])
    for name in dump_files:
        if name in dumps and name not in missing:
            log.info("calibration data: %s (%d DiT calls), reused", dump_files[name], len(dumps[name].samples))
    report.calls_by_expert = {name: len(dump.samples) for name, dump in dumps.items()}
    report.denoiser_calls = sum(report.calls_by_expert.values())
    with staged_directory(request.save_path, request.overwrite) as staging:
        for expert in family.experts:
            dump = dumps.get(expert.folder)
            if dump is not None and sd.dump_config.enable_dump and dump_in_output:
                dump.save(staging / dump_files[expert.folder].name)
            report.descriptions[expert.folder] = quantize_and_write_expert(
                skeletons.pop(expert.folder), family, expert, processors, dump, needs_data, config, model_path,
                staging, request.device.primary)
            dumps.pop(expert.folder, None)  # its samples are no longer needed: released before the next expert
        report.description = report.descriptions[family.experts[0].folder]
        copy_other_components(model_path, staging, family)
        practice = config.model_dump(mode="json", by_alias=True, exclude={"source_dir"})
        if "image" in raw_sampling and "image" not in sd.sampling:  # from spec.dataset: eval samples from it too
            block = practice["spec"]["multimodal_sd_config"]
            key = "model_config" if block.get("model_config") is not None else "inference_config"
            block[key] = {**(block.get(key) or {}), "image": raw_sampling["image"]}
        (staging / f"{family.key}_best_practice.yaml").write_text(yaml.safe_dump(practice, sort_keys=False),
                                                                  encoding="utf-8")
    report.seconds = time.perf_counter() - started
    log.info("saved %s (%s) in %.1f s", request.save_path, report.description.get("model_quant_type"), report.seconds)
    return report


def _sample(pipe, family: DiffusionFamily, sampling: WanInferenceConfig,
            expected: dict[str, dict]) -> dict[str, CalibrationDump]:
    prompts = sampling.prompts
    kwargs = sampling.pipeline_kwargs()
    log.info("sampling %d prompt(s) x %d steps with the float pipeline to capture the DiT's inputs",
             len(prompts), sampling.sample_steps)

    def one(i: int) -> None:
        generator = torch.Generator(device="cpu").manual_seed(sampling.base_seed + i)
        pipe(prompt=prompts[i], generator=generator, **kwargs)

    targets = {name: (denoiser, family.block_list(denoiser)[0])
               for name, denoiser in family.denoisers_of(pipe).items()}
    return capture_block_inputs(targets, one, len(prompts), expected)


def diffusion_model_type(model_type: Optional[str], model_path: Path, config_path: Optional[Path]) -> Optional[str]:
    """The --model_type a `quant` command runs on the diffusion service, None when it is not a diffusion run: a
    diffusion family's name, or a multimodal_sd config (the model type then comes from model_index.json).
    Reads only small files; anything unreadable is left to the service that reports it."""
    if is_diffusion_model_type(model_type):
        return model_type
    from msmodelslim.model.diffusion import family_of_folder

    if isinstance(model_type, str) and model_type.lower() in WAN2_2_LINE:
        return wan2_2_family(model_type, model_path).names[-1]
    if model_type is None and family_of_folder(Path(model_path)) is not None:  # a pipeline folder, no name given
        family = family_of_folder(Path(model_path))
        log.info("--model_type %s: model_index.json names %s", family.names[-1], family.pipeline_class)
        return family.names[-1]
    if config_path is None or not Path(config_path).is_file():
        return None
    from msmodelslim.core.yaml_reader import read_yaml_file

    try:
        data = read_yaml_file(Path(config_path), "", str(config_path))
    except ConfigError:
        return None
    if not (isinstance(data, dict) and data.get("apiversion") == API_VERSION):
        return None
    if model_type is not None:
        return model_type  # refused by name in family_for (planned family, or not a diffusion model)
    raise ConfigError(f"{config_path} is a {API_VERSION} config: give --model_type (supported: "
                      f"{supported_names()}); "
                      f"{model_path} has no model_index.json naming a pipeline this version runs")


def run_diffusion_quant_cli(args, model_type: str) -> int:
    """`msmodelslim quant` for a diffusion pipeline: the options the service has, the others refused by name."""
    from msmodelslim.core.device import parse_device

    for flag, given in (("--resume", args.resume), ("--tag", bool(args.tag)),
                        ("--trust_remote_code", args.trust_remote_code)):
        if given:
            raise UnsupportedError(f"{flag} is not supported for diffusion pipelines yet (it belongs to the "
                                   f"diffusion transformer work); a diffusers pipeline never runs code from its folder")
    report = quantize_diffusion(DiffusionQuantizeRequest(
        model_path=args.model_path, save_path=args.save_path, model_type=model_type,
        device=parse_device(args.device), config_path=args.config_path, quant_type=args.quant_type,
        overwrite=args.overwrite, dry_run=args.dry_run))
    if args.dry_run:
        for name, rule in report.plan.items():
            print(f"{rule}  {name}")
        return 0
    how = "sampled the float pipeline" if report.sampled else "reused the calibration dump" \
        if report.denoiser_calls else "no calibration data needed"
    print(f"wrote {report.save_path} ({report.description.get('model_quant_type')}, {len(report.plan)} DiT linears "
          f"quantized; {how}, {report.denoiser_calls} DiT calls) in {report.seconds:.1f} s")
    return 0
