"""The refusals of a quantize request that need only its config (and, for the layer plan, the meta-device
model): run before any weight is read, each naming what cannot be done and what to do instead."""
from __future__ import annotations

from msmodelslim.core.config import PracticeConfig
from msmodelslim.core.errors import ConfigError, UnsupportedError
from msmodelslim.format.ascendv1.kv_cache import UNSUPPORTED_KV_CACHE as ASCENDV1_UNSUPPORTED_KV_CACHE
from msmodelslim.format.ascendv1.writer import AscendV1Writer
from msmodelslim.format.compressed_tensors.writer import CompressedTensorsWriter
from msmodelslim.format.mindie import MindIEWriter
from msmodelslim.processor.base import Processor


def process_steps(configs) -> list:
    return [s for c in configs for s in (process_steps(c.configs) if c.type == "group" else [c])]


def rotates_online(step) -> bool:
    """quarot, or adapt_rotation's stage 2 (quarot with a learned rotation), with online: true."""
    return step.type in ("quarot", "adapt_rotation") and bool(getattr(step, "online", False))


WRITER_CLASSES = {"ascendv1_saver": AscendV1Writer, "compressed_tensors": CompressedTensorsWriter,
                  "mindie_format_saver": MindIEWriter}


def writer_class_of(saver_type: str):
    return WRITER_CLASSES[saver_type]


def refuse_duplicate_savers(config: PracticeConfig) -> None:
    """One saver, or one of each format: two savers of one type would write the same files twice."""
    types = [save.type for save in config.spec.save]
    if not types:
        raise ConfigError("spec.save is empty; give one saver (ascendv1_saver, compressed_tensors or "
                          "mindie_format_saver), or one of each")
    repeated = sorted({t for t in types if types.count(t) > 1})
    if repeated:
        raise ConfigError(f"spec.save holds {types.count(repeated[0])} savers of type {repeated[0]}; one run writes "
                          f"each format once. Keep one {repeated[0]} entry (with several formats, give one saver "
                          f"of each type: each is written to its own subfolder of --save_path)")


def refuse_steps_the_format_lacks(config: PracticeConfig) -> None:
    """A step whose output a chosen format cannot hold (e.g. C8 in compressed-tensors), named before any work;
    with two savers, each format's refusals apply."""
    for save in config.spec.save:
        writer_class = writer_class_of(save.type)
        kv_cache_refusals = getattr(writer_class, "UNSUPPORTED_KV_CACHE", ASCENDV1_UNSUPPORTED_KV_CACHE)
        for step in process_steps(config.spec.process):
            reason = getattr(writer_class, "UNSUPPORTED_STEPS", {}).get(step.type)
            if step.type == "dynamic_cache":  # which KV cache the engine reads depends on the format
                reason = kv_cache_refusals.get(step.qconfig.dtype.value)
            if rotates_online(step):
                reason = getattr(writer_class, "UNSUPPORTED_ONLINE_ROTATION", None)
            step_refusal = getattr(writer_class, "step_refusal", None)
            reason = reason or (step_refusal(step) if step_refusal else None)
            if reason:
                raise UnsupportedError(f"spec.process: {step.type} cannot be saved as {save.type}: {reason}")


def online_rotated_subgraphs(quarot) -> set[str]:
    """The smoothing subgraphs whose targets read an input that quarot's online rotations rotate: o_proj ("ov")
    in every layer, down_proj ("up-down") when layers are listed."""
    return {"ov", "up-down"} if quarot.down_proj_online_layers else {"ov"}


def refuse_smoothing_after_online_rotation(config: PracticeConfig) -> None:
    """A smoothing step after `quarot` with online: true would scale the columns of layers whose input is rotated
    at run time (a scale on X is not one on T·X): named before any work, with the order that works."""
    rotated: set[str] = set()
    for step in process_steps(config.spec.process):
        if rotates_online(step):
            rotated = online_rotated_subgraphs(step)
            continue
        kinds = [k for k in getattr(step, "enable_subgraph_type", None) or [] if k in rotated]
        if kinds:
            raise UnsupportedError(f"spec.process: {step.type} after quarot with online: true would smooth the "
                                   f"{', '.join(kinds)} subgraph(s), whose targets (o_proj, down_proj) read an input "
                                   f"rotated at run time; put {step.type} before quarot, or leave "
                                   f"{', '.join(kinds)} out of its enable_subgraph_type")


# What may follow flatquant: steps that quantize the transformed linears or leave them alone.
AFTER_FLATQUANT = ("linear_quant", "dynamic_cache", "fa3_quant")


def refuse_steps_around_flatquant(config: PracticeConfig) -> None:
    """flatquant learns each layer's run-time transform against the block as it stands, for the W4A4 rounding that
    follows: a later step that changes the linears (smoothing, rotations, other weight methods) would undo what
    it learned, and a layer takes one run-time transform (no online rotation beside it). Named before any work."""
    steps = process_steps(config.spec.process)
    first = next((i for i, step in enumerate(steps) if step.type == "flatquant"), None)
    if first is None:
        return
    late = [s.type for s in steps[first + 1 :] if s.type not in AFTER_FLATQUANT]
    if late:
        raise UnsupportedError(f"spec.process: {', '.join(late)} after flatquant is not supported: flatquant learns "
                               f"each layer's transform against the block as it stands; put {late[0]} before "
                               f"flatquant, and only {', '.join(AFTER_FLATQUANT)} after it")
    online = [s.type for s in steps if rotates_online(s)]
    if online:
        raise UnsupportedError(f"spec.process: {online[0]} with online: true beside flatquant is not supported: a "
                               f"layer takes one run-time transform; use {online[0]} with online: false before "
                               f"flatquant")


def refuse_schemes_the_format_lacks(config: PracticeConfig, plan: dict[str, str]) -> None:
    """A layer whose planned scheme a chosen format has no layout for (e.g. W8A8_MIX in compressed-tensors)."""
    for save in config.spec.save:
        unsupported = writer_class_of(save.type).UNSUPPORTED
        for name, scheme in plan.items():
            if scheme in unsupported:
                raise UnsupportedError(f"{name} would be {scheme}, which {save.type} cannot hold: {unsupported[scheme]}")


def refuse_undistributable(configs: list, processors: list[Processor], where: str = "spec.process") -> None:
    """dp_layer_wise runs only processors that merge their statistics across ranks; say which one does not.
    `configs`: the steps the processors were built from, listed at `where` (spec.process, or a prior stage's)."""
    for i, processor in enumerate(processors):
        reason = processor.data_parallel_refusal()
        if reason:
            raise UnsupportedError(
                f"{where}[{i}] ({configs[i].type}) cannot run under dp_layer_wise: {reason}. "
                f"Use spec.runner: layer_wise (one device), or change that step"
            )


def refuse_mismatched_modality(config: PracticeConfig, adapter: object, model_type: str) -> None:
    """A VLM config needs a vision-language adapter (it feeds images), and a text config a text one (a VLM adapter
    takes image samples, not texts): the mismatch is named before any weight is read."""
    is_vlm_adapter = bool(getattr(adapter, "is_vlm", False))
    if config.is_vlm and not is_vlm_adapter:
        raise ConfigError(f"the config is apiversion multimodal_vlm_modelslim_v1 (image calibration) but "
                          f"--model_type {model_type} is a text model ({type(adapter).__name__}); use a modelslim_v1 "
                          f"config (or --quant_type) for it, or give the vision-language model's --model_type")
    if is_vlm_adapter and not config.is_vlm:
        raise ConfigError(f"--model_type {model_type} is a vision-language model ({type(adapter).__name__}) and "
                          f"calibrates on images; its config must be apiversion multimodal_vlm_modelslim_v1 (this "
                          f"one is {config.apiversion}): see docs/vlm.md, or use --quant_type")


def refuse_split_fused_groups(plan: dict[str, str], fused_groups: tuple[tuple[str, ...], ...]) -> None:
    """Layers the engine fuses into one (q/k/v, gate/up, a family's own pairs) must share one scheme: the serving
    side loads a fused layer with one kernel. Found here from the plan, before any weight is read, rather than by
    the format checklist after the run."""
    for group in fused_groups:
        parents = {name.rsplit(".", 1)[0] for name in plan if name.rsplit(".", 1)[-1] in group}
        for parent in sorted(parents):
            members = {f"{parent}.{m}": plan[f"{parent}.{m}"] for m in group if f"{parent}.{m}" in plan}
            if len(set(members.values())) > 1:
                listed = ", ".join(f"{name} {scheme}" for name, scheme in members.items())
                raise UnsupportedError(f"layers the engine fuses into one would get different schemes ({listed}); "
                                       f"give them one rule (or exclude all of them) in spec.process")
