"""The processor catalogue: YAML `type` -> (config model, processor class)."""
from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from msmodelslim.processor.base import PROCESSORS, build_processor  # noqa: F401 - re-exported
from msmodelslim.processor.adapt_rotation import processor as _adapt_rotation  # noqa: F401 - "adapt_rotation"
from msmodelslim.processor.adapt_rotation.config import AdaptRotationConfig
from msmodelslim.processor.autoround import processor as _autoround  # noqa: F401 - registers "autoround_quant"
from msmodelslim.processor.autoround.config import AutoRoundQuantConfig
from msmodelslim.processor.dynamic_cache import processor as _dynamic_cache  # noqa: F401 - registers "dynamic_cache"
from msmodelslim.processor.dynamic_cache.config import DynamicCacheConfig
from msmodelslim.processor.fa3_quant import processor as _fa3_quant  # noqa: F401 - registers "fa3_quant"
from msmodelslim.processor.fa3_quant.config import FA3QuantConfig
from msmodelslim.processor.flex_awq_ssz import processor as _flex_awq  # noqa: F401 - registers "awq", "flex_awq_ssz"
from msmodelslim.processor.flex_awq_ssz.config import AwqConfig, FlexAwqSszConfig
from msmodelslim.processor.flex_smooth_quant import processor as _flex  # noqa: F401 - registers "flex_smooth_quant"
from msmodelslim.processor.flex_smooth_quant.config import FlexSmoothQuantConfig
from msmodelslim.processor.flatquant import processor as _flatquant  # noqa: F401 - registers "flatquant"
from msmodelslim.processor.flatquant.config import FlatQuantConfig
from msmodelslim.processor.float_sparse import processor as _float_sparse  # noqa: F401 - registers "float_sparse"
from msmodelslim.processor.float_sparse.config import FloatSparseConfig
from msmodelslim.processor.group import processor as _group  # noqa: F401 - registers "group"
from msmodelslim.processor.group.config import GroupConfig
from msmodelslim.processor.iter_smooth import processor as _iter_smooth  # noqa: F401 - registers "iter_smooth"
from msmodelslim.processor.iter_smooth.config import IterSmoothConfig
from msmodelslim.processor.kv_smooth import processor as _kv_smooth  # noqa: F401 - registers "kv_smooth"
from msmodelslim.processor.kv_smooth.config import KVSmoothConfig
from msmodelslim.processor.linear_quant import processor as _linear_quant  # noqa: F401 - registers "linear_quant"
from msmodelslim.processor.linear_quant.config import LinearQuantConfig
from msmodelslim.processor.quarot import processor as _quarot  # noqa: F401 - registers "quarot"
from msmodelslim.processor.quarot.config import QuaRotConfig
from msmodelslim.processor.smooth_quant import processor as _smooth_quant  # noqa: F401 - registers "smooth_quant"
from msmodelslim.processor.smooth_quant.config import SmoothQuantConfig
from msmodelslim.processor.svd_res import processor as _svd_res  # noqa: F401 - registers "svd_res"
from msmodelslim.processor.svd_res.config import SvdResConfig

ProcessorConfig = Annotated[
    Union[LinearQuantConfig, GroupConfig, SmoothQuantConfig, IterSmoothConfig, FlexSmoothQuantConfig, QuaRotConfig,
          FlexAwqSszConfig, AwqConfig, AutoRoundQuantConfig, FloatSparseConfig, DynamicCacheConfig, KVSmoothConfig,
          FA3QuantConfig, SvdResConfig, AdaptRotationConfig, FlatQuantConfig],
    Field(discriminator="type"),
]
GroupConfig.model_rebuild(_types_namespace={"ProcessorConfig": ProcessorConfig})



class DoubleMatchError(ValueError):
    pass


def merge_claims(named_claims: list[tuple[str, dict[str, str]]]) -> dict[str, str]:
    """Union of several processors' claims; a layer claimed twice is an error naming both rules."""
    merged: dict[str, str] = {}
    for where, claims in named_claims:
        for layer, rule in claims.items():
            here = f"{where}: {rule}"
            if layer in merged:
                raise DoubleMatchError(f"layer {layer} is matched by two rules: [{merged[layer]}] and [{here}]; "
                                       f"narrow an include or add an exclude so each layer is configured once")
            merged[layer] = here
    return merged
