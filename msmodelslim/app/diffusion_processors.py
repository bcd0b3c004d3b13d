"""The process steps (spec.process) of a diffusion run on its DiT: built (at the attention modules and smoothing
subgraphs the family describes, or from the registry), checked on the meta-device skeleton, and the plan of which
linear each step quantizes, all before any weight is read."""
from __future__ import annotations

from torch import nn

from msmodelslim.core.errors import ConfigError, UnsupportedError
from msmodelslim.model.diffusion.dit import block_list_names, block_walk
from msmodelslim.model.diffusion.wan import DiffusionFamily
from msmodelslim.processor.base import Processor, ProcessorContext, build_processor, quant_rules
from msmodelslim.processor.fa3_dit import DitFA3Processor
from msmodelslim.processor.smooth_dit import DIT_SMOOTHERS, build_dit_smoother
from msmodelslim.processor.online_quarot.processor import OnlineQuaRotProcessor


def plan_linears(denoiser: nn.Module, family: DiffusionFamily, processors: list[Processor]) -> dict[str, str]:
    """{linear: rule} for the DiT block linears the processors claim; outside the blocks nothing is quantized."""
    prefixes = tuple(f"{name}." for name in block_list_names(family))
    names = [n for n, m in denoiser.named_modules() if isinstance(m, nn.Linear) and n.startswith(prefixes)]
    plan: dict[str, str] = {}
    for processor in processors:
        for name, rule in processor.claims(names).items():
            if name in plan:
                raise ConfigError(f"{name} is matched by two process steps ({plan[name]} and {rule}); quantize each "
                                  f"linear once (narrow include/exclude)")
            plan[name] = rule
    return plan


def build_dit_processors(configs: list, family: DiffusionFamily) -> list[Processor]:
    """One processor per spec.process step: linear_quant from the registry; online_quarot and fa3_quant at the DiT
    attention modules the family describes (model/diffusion/attention.py), iter_smooth and smooth_quant at its
    smoothing subgraphs (model/diffusion/smoothing.py); each refused by name where the family describes none."""
    processors: list[Processor] = []
    for i, config in enumerate(configs):
        if config.type in ("online_quarot", "fa3_quant"):
            if getattr(family, "attention", None) is None:
                raise UnsupportedError(f"spec.process[{i}].type: {config.type} is not supported yet for "
                                       f"{family.names[-1]} (it belongs to the diffusion transformer work: its "
                                       f"adapter describes no attention modules, DiffusionFamily.attention); "
                                       f"remove the step")
            cls = OnlineQuaRotProcessor if config.type == "online_quarot" else DitFA3Processor
            processors.append(cls(config, family.attention))
        elif config.type in DIT_SMOOTHERS:  # at the subgraphs the family describes (model/diffusion/smoothing.py)
            context = ProcessorContext(adapter_name=f"diffusion:{family.key}",
                                       following=quant_rules(configs[i + 1:]))
            processors.append(build_dit_smoother(config, context, getattr(family, "smoothing", None),
                                                 family.names[-1]))
        else:
            context = ProcessorContext(adapter_name=f"diffusion:{family.key}",
                                       following=quant_rules(configs[i + 1:]))
            processors.append(build_processor(config, context))
    return processors


def check_dit_processors(denoiser: nn.Module, family: DiffusionFamily, processors: list[Processor]) -> None:
    """Each processor's checks on the meta-device DiT (before any weight is read)."""
    block_names = [name for name, _ in block_walk(family, denoiser)]
    for processor in processors:
        processor.check_model(denoiser, block_names)
